"""train.warmup_ratio reaches the real learning-rate scheduler as the same number of warm-up steps on
every transformers version ftkit accepts (5.x reads a float < 1 in warmup_steps as a ratio, 4.x as steps)."""

import math

import pytest
import torch

from ftkit.core.config import load_config
from ftkit.core.paths import RunPaths
from ftkit.train.trainer import build_trainer, optimizer_steps, warmup_steps


def _transformers4_warmup(self, num_training_steps: int):
    """transformers 4.56's TrainingArguments.get_warmup_steps: warmup_steps (an int field there) wins
    when above 0, else warmup_ratio."""
    ratio = getattr(self, "warmup_ratio", 0.0) or 0.0
    return self.warmup_steps if self.warmup_steps > 0 else math.ceil(num_training_steps * ratio)


def _trainer(tmp_path, tiny_path, ratio: float, **train):
    from ftkit.core.modeling import load_model, load_tokenizer
    from ftkit.train.loading import add_lora

    cfg = load_config(experiment="wu", outputs_dir=str(tmp_path), model={"name": "tiny-random"},
                      train={"batch_size": 2, "gradient_accumulation_steps": 2, "epochs": 2.5, "warmup_ratio": ratio,
                             "lr_scheduler": "linear", "eval_steps": 0, **train})
    model = add_lora(load_model(tiny_path, cfg.model), cfg)
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, 8]} for _ in range(23)]
    return build_trainer(cfg, RunPaths(cfg.outputs_dir, cfg.experiment), model, load_tokenizer(tiny_path), rows, [])


def _factors(trainer, total: int) -> list[float]:
    """The learning-rate multipliers of the ``total`` steps taken (0..total-1), from the Trainer's own scheduler."""
    trainer.create_optimizer_and_scheduler(num_training_steps=total)
    return [trainer.lr_scheduler.lr_lambdas[0](k) for k in range(total)]


def _warmup_length(factors: list[float]) -> int:
    """How many steps the multiplier rises for, checked to be the linear warm-up k/n."""
    n = next((k for k in range(len(factors) - 1) if factors[k + 1] <= factors[k]), len(factors))
    assert factors[:n] == pytest.approx([k / n for k in range(n)]), factors
    return n


def test_optimizer_steps_counts_as_the_trainer_does():
    # 23 examples, micro-batch 2: 12 micro-batches; accumulation 2: 6 steps an epoch; 2.5 epochs: 15 steps
    assert optimizer_steps(23, 2, 2, 1, 2.5) == 15
    assert optimizer_steps(23, 2, 2, 2, 2.5) == 8  # two processes: 6 micro-batches each, 3 steps an epoch, 7.5 -> 8
    assert optimizer_steps(23, 2, 2, 4, 1.0) == 2
    assert optimizer_steps(3, 4, 8, 1, 1.0) == 1  # at least one step an epoch
    assert optimizer_steps(23, 2, 2, 1, 2.5, max_steps=40) == 40
    assert warmup_steps(0.2, 15) == 3 and warmup_steps(0.21, 15) == 4 and warmup_steps(0.07, 100) == 7
    with pytest.raises(ValueError, match="warmup_ratio"):
        warmup_steps(1.5, 10)


@pytest.mark.parametrize("reading", ["installed", "transformers 4"])
@pytest.mark.parametrize(("ratio", "expected"), [(0.2, 3), (0.21, 4), (1.0, 15), (0.0, 0)])
def test_scheduler_warms_up_over_ceil_ratio_times_steps(tmp_path, tiny_path, monkeypatch, reading, ratio, expected):
    """15 optimiser steps (23 examples, micro-batch 2, accumulation 2, 2.5 epochs): the scheduler rises
    over ceil(ratio x 15) steps, with transformers' own get_warmup_steps and with 4.x's."""
    if reading == "transformers 4":
        from transformers import TrainingArguments

        monkeypatch.setattr(TrainingArguments, "get_warmup_steps", _transformers4_warmup)
    torch.manual_seed(0)
    trainer = _trainer(tmp_path, tiny_path, ratio)
    assert trainer.args.warmup_steps == expected and isinstance(trainer.args.warmup_steps, int)
    assert _warmup_length(_factors(trainer, 15)) == expected


def test_max_steps_sets_the_total(tmp_path, tiny_path):
    trainer = _trainer(tmp_path, tiny_path, 0.25, max_steps=10)
    assert _warmup_length(_factors(trainer, 10)) == 3  # ceil(0.25 x 10)
