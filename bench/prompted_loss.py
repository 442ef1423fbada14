"""Stage 04's prompted loss pass: every prompted row reads the same system prompt and few-shot
turns before its own conversation. Scoring the rows on one cached forward of that shared prefix
against reading every row whole, in one process, on the same rows and model.

Uses an experiment's stage 02 output (default: the demo, ``make 02``) and the base model of its
parameters file; prints both timings, the ratio, and the largest difference between the two sets
of per-row losses.

Run: .venv/bin/python bench/prompted_loss.py [--params parameters/demo.yaml] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default=str(ROOT / "parameters" / "demo.yaml"))
    ap.add_argument("--outputs", default=str(ROOT / "outputs"))
    ap.add_argument("--repeats", type=int, default=2, help="timed passes of each variant (alternating)")
    args = ap.parse_args()

    import torch

    from ftkit.core.config import load_config
    from ftkit.core.files import iter_jsonl
    from ftkit.core.modeling import load_model, load_tokenizer, resolve_model_path
    from ftkit.core.paths import RunPaths
    from ftkit.evaluate.loss import example_losses
    from ftkit.evaluate.prompting import Prompting, choose_shots, prompted_row

    cfg = load_config(args.params, outputs_dir=args.outputs)
    paths = RunPaths(Path(args.outputs), cfg.experiment)
    chat = paths.require(paths.chat("test"), "02_format_conversion")
    tok = load_tokenizer(paths.require(paths.tokenizer_dir, "02_format_conversion"), cfg.model)
    model = load_model(resolve_model_path(cfg.model.name), cfg.model).eval()
    e = cfg.evaluate
    shots, _ = choose_shots(paths.chat("train"), e.prompting.few_shot, cfg.seed)
    prompting = Prompting(e.prompting.system_prompt, shots, [])
    rows = [prompted_row(tok, r["messages"], prompting) for r in iter_jsonl(chat) if "messages" in r]
    whole = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
    torch.set_num_threads(cfg.train.num_threads or torch.get_num_threads())

    times = {"whole": [], "cached_prefix": []}
    losses = {}
    for _ in range(args.repeats):
        for name, data in (("whole", whole), ("cached_prefix", rows)):
            t = time.perf_counter()
            losses[name] = example_losses(model, iter(data), tok.pad_token_id, e.batch_size)
            times[name].append(time.perf_counter() - t)
    a, b = losses["whole"], losses["cached_prefix"]
    assert a[1] == b[1], "trained-token counts differ"
    rel = max(abs(x - y) / max(abs(x), 1e-9) for x, y in zip(a[0], b[0], strict=True))
    best = {k: min(v) for k, v in times.items()}
    result = {"experiment": cfg.experiment, "rows": len(rows), "tokens_per_row_mean": sum(len(r["input_ids"]) for r in rows) / len(rows),
              "shared_prefix_tokens": rows[0].get("prefix_len"), "threads": torch.get_num_threads(),
              "seconds_whole": best["whole"], "seconds_cached_prefix": best["cached_prefix"],
              "speedup": best["whole"] / best["cached_prefix"], "max_rel_loss_diff": rel, "all_times": times}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
