"""Host time of a training step: the stock transformers Trainer against ftkit's LeanTrainer.

A host-bound GPU step (Qwen2.5-1.5B with LoRA on an H200: ~250 ms, the GPU idle part of it) pays for
every millisecond of Python between kernels. This measures that Python on the CPU, where it can be
separated from the maths: a model with Qwen2.5-1.5B's module tree (28 layers, LoRA r=16 on every linear
layer: 2,333 modules, 731 parameters) but a hidden size of 64, so each step's arithmetic is small and
its time is mostly the Trainer's and the model's host work. Both trainers run the same steps on the
same data in this process, interleaved (stock, lean, stock, lean) so drift hits both; the first
``--warmup`` steps of each run are not timed.

Run: ``python bench/host_overhead.py`` (``make bench-host``). Prints the mean step time of each and
the ratio, and the time a step saves.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Trainer, TrainerCallback, TrainingArguments

from ftkit.train.lean_trainer import LeanTrainer


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int, length: int):
        g = torch.Generator().manual_seed(0)
        self.rows = [torch.randint(0, 512, (length,), generator=g) for _ in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i].clone()}


def model():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=28, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
    return get_peft_model(Qwen2ForCausalLM(cfg), LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                           target_modules="all-linear"))


def step_times(trainer_class, warmup: int, steps: int) -> list[float]:
    marks = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=warmup + steps, per_device_train_batch_size=8,
                                 learning_rate=1e-4, logging_steps=10_000, save_strategy="no", seed=0,
                                 use_cpu=True, report_to=[], disable_tqdm=True, dataloader_num_workers=0)
        trainer = trainer_class(model=model(), args=args, train_dataset=Rows(8 * (warmup + steps), 16),
                                callbacks=[Clock()])
        trainer.train()
    return [b - a for a, b in itertools.pairwise(marks[warmup - 1:])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(1)  # one host thread, as a GPU run's Python has
    times = {"stock Trainer": [], "LeanTrainer": []}
    for r in range(a.rounds):
        for name, cls in (("stock Trainer", Trainer), ("LeanTrainer", LeanTrainer)):
            t = step_times(cls, a.warmup, a.steps)
            times[name] += t
            print(f"round {r + 1}: {name:14s} median {statistics.median(t) * 1000:7.2f} ms a step")
    means = {k: statistics.mean(v) * 1000 for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:14s} {means[k]:7.2f} ms a step (median {statistics.median(v) * 1000:.2f}, {len(v)} steps)")
    saved = means["stock Trainer"] - means["LeanTrainer"]
    print(f"LeanTrainer / stock step time: {means['LeanTrainer'] / means['stock Trainer']:.3f} "
          f"({saved:.1f} ms of host time saved a step)")


if __name__ == "__main__":
    main()
