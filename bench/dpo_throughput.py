"""DPO training speed and memory on one GPU: TRL's own default set-up against ftkit's stage 03, one process.

Both train DPO with LoRA (r=16, alpha 32, all linear layers, dropout 0) on the same random-weight model
shape (``--arch``, default Llama-3.1-8B), the same pairs, micro-batch, learning rate, schedule and seed:

* **trl**: what TRL's documentation does: ``DPOTrainer(model, args=DPOConfig(...), peft_config=LoraConfig(...))``
  on the bf16 model, every other option TRL's default (its collator, SDPA attention, the fp32 AdamW,
  no compilation; the reference is TRL's frozen copy of the new adapter);
* **ftkit**: ``ftkit.train.training.run_training`` with ``train.objective: dpo`` — stage 03 as a
  notebook runs it, with the GPU device plan (compiled decoder layers, fused AdamW, ...).

Pairs are random token ids with Bitext's (length, prompt length) shapes (``bench/bitext_lengths.json``):
the prompt is the first part, the chosen reply the rest, the rejected reply another draw's reply.
Both skip tokenisation (the rows are ids; TRL's dataset preparation is passed through, as stage 03's is).
Tokens/s counts every non-pad token of both sequences of each pair in the timed steps.

Run: ``python bench/dpo_throughput.py --tokenizer DIR [--arch llama-3.1-8b] --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from train_throughput import LORA, build_model, free_gpu, model_dir_for  # noqa: E402


def make_pairs(n: int, seed: int, vocab: int) -> list[dict]:
    rng = random.Random(seed)
    shapes = json.loads((HERE / "bitext_lengths.json").read_text())["pairs"]
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        total, prompt = rng.choice(shapes)
        other_total, other_prompt = rng.choice(shapes)
        ids = torch.randint(100, vocab, (total + max(other_total - other_prompt, 1),), generator=g).tolist()
        rows.append({"prompt_ids": ids[:prompt], "chosen_ids": ids[prompt:total],
                     "rejected_ids": ids[total:total + max(other_total - other_prompt, 1)]})
    return rows


class Timer:
    """Times the steps after ``warmup`` (CUDA synchronised at both ends) and counts their tokens."""

    def __init__(self, rows: list[dict], batch: int, warmup: int, steps: int):
        self.rows, self.batch, self.warmup, self.total = rows, batch, warmup, warmup + steps
        self.t0 = self.t1 = None

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class _T(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step in (timer.warmup, timer.total):
                    torch.cuda.synchronize()
                    setattr(timer, "t0" if state.global_step == timer.warmup else "t1", time.perf_counter())

        return _T()

    def result(self, order: list[int] | None = None) -> dict:
        seconds = self.t1 - self.t0
        idx = order if order is not None else list(range(len(self.rows)))
        timed = [self.rows[i] for i in idx[self.warmup * self.batch:self.total * self.batch]]
        tokens = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in timed)
        return {"tokens_per_second": tokens / seconds, "step_time_s": seconds / (self.total - self.warmup),
                "pairs_per_second": len(timed) / seconds, "timed_steps": self.total - self.warmup,
                "peak_memory_gb": torch.cuda.max_memory_allocated() / 1024**3}


def run_trl(arch, tok, rows, batch, lr, warmup, steps, seed, out) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from ftkit.train.preference import pretokenised

    free_gpu()
    model = build_model(arch, tok)
    model.config.use_cache = False
    timer = Timer(rows, batch, warmup, steps)
    args = DPOConfig(output_dir=str(out / "trl"), per_device_train_batch_size=batch, learning_rate=lr,
                     max_steps=warmup + steps, logging_steps=10_000, save_strategy="no", report_to="none",
                     bf16=True, seed=seed, data_seed=seed, max_length=None, train_sampling_strategy="sequential",
                     dataset_num_proc=None)
    trainer = pretokenised(DPOTrainer)(
        model=model, args=args, processing_class=tok, train_dataset=Dataset.from_list(rows),
        peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                               target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=[timer.callback()])
    trainer.train()
    res = {**timer.result(), "gradient_checkpointing": bool(args.gradient_checkpointing)}
    del trainer, model
    return res


def run_ftkit(model_dir, tok_dir, rows, batch, lr, warmup, steps, seed, out, max_memory_gb=None) -> dict:
    from ftkit.core.config import load_config
    from ftkit.core.files import write_jsonl
    from ftkit.core.paths import RunPaths
    from ftkit.train.recipe import Recipe
    from ftkit.train.training import run_training

    free_gpu()
    cfg = load_config(experiment="dpo-bench", seed=seed, outputs_dir=str(out), model={"name": str(model_dir)},
                      train={"objective": "dpo", "batch_size": batch, "learning_rate": lr, "compile": True,
                             "max_steps": warmup + steps, "logging_steps": 10_000, "eval_steps": 0,
                             "save_steps": 0, "resume": "never", "lora": LORA, "max_memory_gb": max_memory_gb})
    paths = RunPaths(Path(out), cfg.experiment)
    import shutil

    shutil.rmtree(paths.root, ignore_errors=True)  # a run of its own, never a resumed one
    paths.formatted_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(paths.tokens("train"), [{"input_ids": r["prompt_ids"] + r["chosen_ids"], "labels": [], **r}
                                        for r in rows])
    write_jsonl(paths.tokens("val"), [])
    shutil.copytree(tok_dir, paths.tokenizer_dir)
    timer = Timer(rows, batch, warmup, steps)

    class Timed(Recipe):
        def trainer(self, trainer):  # the trainer stage 03 builds, timed, reading the pairs in TRL's run's order
            trainer.add_callback(timer.callback())
            trainer.args.train_sampling_strategy = "sequential"
            return trainer

    _, metrics = run_training(cfg, paths, Timed())
    return {**timer.result(), "device_plan": metrics["device_plan"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--arch", default="llama-3.1-8b")
    ap.add_argument("--batch", type=int, default=8, help="pairs per micro-batch")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--max-memory-gb", type=float, nargs="*", default=[],
                    help="also run stage 03 planned for these memory budgets (train.max_memory_gb)")
    ap.add_argument("--budgets-only", action="store_true", help="only the --max-memory-gb runs (no unbounded, no TRL)")
    ap.add_argument("--work", default="/tmp/dpo-bench")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from ftkit.core.modeling import prepare_tokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    prepare_tokenizer(tok)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    n = (args.warmup + args.steps) * args.batch
    rows = make_pairs(n, 0, len(tok))
    result = {"arch": args.arch, "batch_pairs": args.batch, "warmup": args.warmup, "steps": args.steps,
              "device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    model_dir = model_dir_for(args.arch, tok, work)
    free_gpu()
    if not args.budgets_only:
        result["ftkit"] = run_ftkit(model_dir, args.tokenizer, rows, args.batch, 1e-5, args.warmup, args.steps, 0, work)
    for gb in args.max_memory_gb:
        result[f"ftkit, max_memory_gb {gb:g}"] = run_ftkit(model_dir, args.tokenizer, rows, args.batch, 1e-5, args.warmup,
                                                           args.steps, 0, work, max_memory_gb=gb)
        torch.cuda.set_per_process_memory_fraction(1.0)  # the cap stage 03 set stays with the process
    if not args.budgets_only:
        result["trl"] = run_trl(args.arch, tok, rows, args.batch, 1e-5, args.warmup, args.steps, 0, work)
        result["ratio_tokens_per_second"] = result["ftkit"]["tokens_per_second"] / result["trl"]["tokens_per_second"]
        result["ratio_peak_memory"] = result["ftkit"]["peak_memory_gb"] / result["trl"]["peak_memory_gb"]
    print(json.dumps(result, indent=1))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"dpo-{args.arch}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
