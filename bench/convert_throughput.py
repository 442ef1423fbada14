"""Benchmark: convert, validate and mask 100,000 two-turn conversations (issue target: < 90 s on 2 cores).

Prints records/s for the parallel path that stage 02 uses on large splits (datasets.map over the
cores) and, as the baseline measured in the same run, the same work on one process over a
sample. Run: .venv/bin/python bench/convert_throughput.py [N]
"""

import os
import sys
import time

from ftkit.convert.conversion import process_many, process_record
from ftkit.core.formats import Detection, to_canonical
from ftkit.core.masking import end_of_turn_token_id
from ftkit.core.modeling import load_tokenizer, resolve_model_path
from ftkit.core.validation import validate
from ftkit.data.demo_data import generate


def conversations(n: int) -> list[dict]:
    rows = [r for r in generate(n, seed=1) if r["reply"].strip()]
    det = Detection("columns", "bench", {"user": "ticket", "assistant": "reply"})
    out = []
    for i in range(0, len(rows) - 1, 2):  # two exchanges per conversation
        a, b = to_canonical(rows[i], det), to_canonical(rows[i + 1], det)
        out.append({"id": str(i), "messages": a["messages"] + b["messages"], "meta": {}})
    return out


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    tok = load_tokenizer(resolve_model_path("smollm2-135m-instruct"))
    kw = {"system_prompt": "You are AcmeCorp support.", "max_seq_len": 512, "over_length": "drop",
          "eot_text": tok.decode([end_of_turn_token_id(tok)])}
    convs = conversations(2 * n + 400)[:n]
    print(f"{len(convs):,} two-turn conversations, {os.cpu_count()} cores")

    sample = convs[:5000]
    t = time.perf_counter()
    for r in sample:
        assert not validate(r)
        process_record(tok, r, **kw)
    base_rate = len(sample) / (time.perf_counter() - t)
    print(f"baseline, one process: {base_rate:,.0f} records/s (on {len(sample):,})")

    t = time.perf_counter()
    bad = sum(1 for r in convs if validate(r))
    out = process_many(tok, convs, **kw)
    secs = time.perf_counter() - t
    ok = sum(1 for o in out if o["ok"])
    print(f"stage 02 path: {len(convs):,} records in {secs:.1f} s = {len(convs) / secs:,.0f} records/s "
          f"({ok:,} converted, {bad} invalid); speed-up {len(convs) / secs / base_rate:.2f}x; "
          f"target < 90 s: {'met' if secs < 90 else 'NOT met'}")


if __name__ == "__main__":
    main()
