"""Stage 04's loss pass keeps memory flat: peak memory evaluating all Bitext pairs vs evaluating 100.

Tokenises the 4,514 Bitext customer-support pairs (read in place from ../shared/data, written
only to a temporary directory) with the model's chat template, then measures, each in a fresh
child process, the peak resident memory of ``ftkit.evaluate.loss.example_losses`` over the first 100
rows and over all rows, and prints the ratio (target: <= 1.5). Each child also records the
memory just after loading the model, so the growth attributable to evaluation is visible.

Run: .venv/bin/python bench/eval_memory.py [--model smollm2-135m-instruct] [--small 100]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BITEXT = ROOT.parent / "shared" / "data" / "bitext-customer-support" / "bitext_customer_support_sample.csv"


def tokenise(model_name: str, out: Path) -> int:
    import csv

    from ftkit.core.config import ModelConfig
    from ftkit.core.masking import build_example
    from ftkit.core.modeling import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path(model_name), ModelConfig(name=model_name))
    n = 0
    with open(BITEXT, newline="", encoding="utf-8") as f, open(out, "w") as w:
        for row in csv.DictReader(f):
            msgs = [{"role": "system", "content": "You are a helpful customer support assistant."},
                    {"role": "user", "content": row["instruction"]}, {"role": "assistant", "content": row["response"]}]
            ex = build_example(tok, msgs)
            w.write(json.dumps({"input_ids": ex.input_ids[:768], "labels": ex.labels[:768]}) + "\n")
            n += 1
    return n


def child(model_name: str, rows_path: str, limit: int, batch_size: int) -> None:
    import itertools

    from ftkit.core.config import ModelConfig
    from ftkit.core.files import iter_jsonl
    from ftkit.core.modeling import load_model, load_tokenizer, resolve_model_path
    from ftkit.evaluate.loss import example_losses, summarise_loss

    path = resolve_model_path(model_name)
    model = load_model(path, ModelConfig(name=model_name))
    tok = load_tokenizer(path)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    sums, counts = example_losses(model, itertools.islice(iter_jsonl(Path(rows_path)), limit), tok.pad_token_id,
                                  batch_size)
    print(json.dumps({"rows": len(sums), **summarise_loss(sums, counts), "seconds": time.perf_counter() - t0,
                      "rss_after_load_mb": loaded,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--small", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.model, a.child[0], int(a.child[1]), a.batch_size)
        return
    with tempfile.TemporaryDirectory() as tmp:
        rows = Path(tmp) / "bitext_tokens.jsonl"
        total = tokenise(a.model, rows)
        runs = {}
        for limit in (a.small, total):
            out = subprocess.run([sys.executable, __file__, "--model", a.model, "--batch-size", str(a.batch_size),
                                  "--child", str(rows), str(limit)], capture_output=True, text=True, check=True)
            runs[limit] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{limit:>5} rows: peak RSS {runs[limit]['peak_rss_mb']:.0f} MiB (after loading the model "
                  f"{runs[limit]['rss_after_load_mb']:.0f} MiB), loss {runs[limit]['loss']:.4f}, "
                  f"{runs[limit]['seconds']:.0f} s", flush=True)
        ratio = runs[total]["peak_rss_mb"] / runs[a.small]["peak_rss_mb"]
        print(json.dumps({"model": a.model, "small": runs[a.small], "all": runs[total], "peak_ratio": ratio}))
        print(f"peak memory, {total} rows vs {a.small}: {ratio:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
