"""Greedy or sampled replies to chat prompts, batched with left padding and the KV cache, as stages 01
(replay) and 04 generate them; a reasoning model's think block is split from the answer."""

from __future__ import annotations

import torch

from ftkit.core import reasoning
from ftkit.core.masking import render


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of keys and values one token holds in the cache, over every layer."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


def rows_per_batch(model, rows: int, tokens_per_row: int, budget_bytes: int = 2 * 1024**3) -> int:
    """How many of ``rows`` prompts to generate for at once: all of them when their KV cache fits
    ``budget_bytes``, else as many as do. One batch decodes until its longest reply ends, so fewer,
    larger batches cost less (on 2 CPU cores, SmolLM2-135M: 199 replies of up to 160 tokens in one
    batch took 77 s in bf16; bench/README.md)."""
    per_row = kv_bytes_per_token(model.config, next(model.parameters()).dtype) * tokens_per_row
    return max(1, min(rows, budget_bytes // max(per_row, 1)))


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
