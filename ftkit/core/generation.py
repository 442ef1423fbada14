"""Greedy or sampled replies to chat prompts, batched with left padding and the KV cache, as stages 01
(replay) and 04 generate them; a reasoning model's think block is split from the answer."""

from __future__ import annotations

import torch

from ftkit.core import reasoning
from ftkit.core.masking import render


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int, batch_size: int,
             stop_ids: list[int], do_sample: bool = False, temperature: float = 0.7, top_p: float = 0.95,
             seed: int | None = None) -> list[dict]:
    """Replies for chat prompts, batched with left padding and the KV cache; marks whether each stopped.

    A reply "stopped" when the model emitted one of ``stop_ids`` (the template's end-of-turn or
    EOS) before ``max_new_tokens``; the rest ran on until the cap.
    """
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    if seed is not None:
        torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else \
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    markers = reasoning.markers_for(tokenizer)
    out = []
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [render(tokenizer, p, add_generation_prompt=True) for p in prompts[i:i + batch_size]]
            inside = [reasoning.starts_inside(t, markers) for t in texts]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                                 pad_token_id=tokenizer.pad_token_id, use_cache=True, **sampling)
            new = gen[:, enc["input_ids"].shape[1]:]
            for row, opened in zip(new.tolist(), inside, strict=True):
                stopped = any(t in stop_ids for t in row)
                if stopped:
                    row = row[: next(k for k, t in enumerate(row) if t in stop_ids)]
                # the answer is what is scored, as the server returns it in ``content``
                thought, text = reasoning.split(tokenizer.decode(row, skip_special_tokens=True), markers, opened)
                out.append({"text": text.strip(), "reasoning": thought,
                            "stopped": stopped, "new_tokens": len(row), "token_ids": row})
    finally:
        tokenizer.padding_side = side
    return out
