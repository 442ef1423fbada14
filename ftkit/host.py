"""Stage 05, part two: talk to the running server with the official ``openai`` client."""

from __future__ import annotations

import time

from .formats import prompt_and_reference
from .paths import RunPaths, read_jsonl


def check_prompts(paths: RunPaths, n: int = 3) -> list[list[dict]]:
    """A few held-out chat prompts for the merge check."""
    records = [r for r in read_jsonl(paths.require(paths.chat("test"), "02_format_conversion")) if "messages" in r][:n]
    return [prompt_and_reference(r["messages"])[0] for r in records]


def client_for(server, api_key: str | None):
    from openai import OpenAI

    return OpenAI(base_url=server.base_url, api_key=api_key or "not-needed", max_retries=0, timeout=300)


def ask_all(server, cfg) -> list[dict]:
    """Each of ``host.prompts``: once plain, once streamed; with the system prompt used in training."""
    client = client_for(server, cfg.host.api_key)
    model_id = client.models.list().data[0].id
    system = [{"role": "system", "content": cfg.convert.system_prompt}] if cfg.convert.system_prompt else []
    answers = []
    for prompt in cfg.host.prompts:
        messages = system + [{"role": "user", "content": prompt}]
        t0 = time.perf_counter()
        resp = client.chat.completions.create(model=model_id, messages=messages, max_tokens=cfg.evaluate.max_new_tokens)
        plain_s = time.perf_counter() - t0
        t0, first, pieces = time.perf_counter(), None, []
        for chunk in client.chat.completions.create(model=model_id, messages=messages, stream=True,
                                                    max_tokens=cfg.evaluate.max_new_tokens):
            delta = chunk.choices[0].delta.content if chunk.choices else None
            if delta:
                first = first if first is not None else time.perf_counter() - t0
                pieces.append(delta)
        answers.append({
            "prompt": prompt, "reply": resp.choices[0].message.content, "finish_reason": resp.choices[0].finish_reason,
            "completion_tokens": resp.usage.completion_tokens, "seconds": plain_s,
            "streamed_reply": "".join(pieces), "stream_chunks": len(pieces), "time_to_first_token_s": first,
        })
    return answers


def summary(answers: list[dict]) -> dict:
    return {
        "model_replies": len(answers),
        "all_stopped": all(a["finish_reason"] == "stop" for a in answers),
        "stream_matches_plain": all(a["streamed_reply"].strip() == a["reply"].strip() for a in answers),
        "answers": answers,
    }
