"""A bounded load generator for the OpenAI-compatible server: time to first token and tokens/s.

``c`` client threads each send ``requests_per_client`` streamed chat requests one after another
through the official ``openai`` client, on loopback; nothing else is in flight, so the load is
exactly ``c`` concurrent requests. Tokens are counted from the ``usage`` of the last chunk.
"""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ftkit.core.progress import Progress


def _one(client, model_id: str, messages: list[dict], max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, tokens, finish = None, 0, None
    for chunk in client.chat.completions.create(model=model_id, messages=messages, max_tokens=max_tokens,
                                                stream=True, temperature=0):
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - t0
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        if getattr(chunk, "usage", None):
            tokens = chunk.usage.completion_tokens
    total = time.perf_counter() - t0
    return {"ttft_s": first if first is not None else total, "seconds": total, "completion_tokens": tokens,
            "finish_reason": finish}


def run_level(client, model_id: str, prompts: list[list[dict]], concurrency: int, requests_per_client: int,
              max_tokens: int, progress=None) -> dict:
    """``concurrency`` clients, each sending ``requests_per_client`` requests in turn; ``progress``
    (a :class:`ftkit.core.progress.Progress`) counts the requests answered."""
    rows: list[dict] = []
    lock = threading.Lock()

    def client_loop(c: int) -> None:
        for r in range(requests_per_client):
            row = _one(client, model_id, prompts[(c * requests_per_client + r) % len(prompts)], max_tokens)
            with lock:
                rows.append(row)
            if progress is not None:
                progress.update(concurrency=concurrency)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(client_loop, range(concurrency)))
    wall = time.perf_counter() - t0
    ttft = sorted(r["ttft_s"] for r in rows)
    tokens = sum(r["completion_tokens"] for r in rows)
    per_request = [r["completion_tokens"] / max(r["seconds"] - r["ttft_s"], 1e-9) for r in rows
                   if r["completion_tokens"] > 1]
    return {
        "concurrency": concurrency, "requests": len(rows), "completion_tokens": tokens, "wall_s": wall,
        "ttft_median_s": statistics.median(ttft), "ttft_p90_s": ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))],
        "tokens_per_s_total": tokens / wall,
        "tokens_per_s_per_request": statistics.median(per_request) if per_request else 0.0,
        "requests_per_s": len(rows) / wall,
    }


def measure(server, cfg, prompts: list[list[dict]]) -> list[dict]:
    """One warm-up request, then each of ``host.load_concurrency`` in turn."""
    from ftkit.host.client import api_key, client_for

    client = client_for(server, api_key(cfg))
    model_id = client.models.list().data[0].id
    _one(client, model_id, prompts[0], 4)  # warm-up: first-request costs are not part of the figures
    h = cfg.host
    with Progress("05_host: load test", sum(h.load_concurrency) * h.load_requests_per_client,
                  unit="requests") as progress:
        return [run_level(client, model_id, prompts, c, h.load_requests_per_client, h.load_max_tokens, progress)
                for c in h.load_concurrency]
