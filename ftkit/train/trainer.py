"""The transformers Trainer as stage 03 configures it. It normalises the loss by the number of trained
tokens across the whole accumulated batch (``num_items_in_batch``); warm-up is a whole number of steps."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ftkit.core.batches import TokenizedDataset
from ftkit.core.config import PREFERENCE_OBJECTIVES, ExperimentConfig
from ftkit.core.files import read_jsonl
from ftkit.core.masking import IGNORE_INDEX
from ftkit.core.modeling import (
    resolve_device,
)
from ftkit.core.paths import RunPaths
from ftkit.train.checkpoints import CompleteCheckpointMarker
from ftkit.train.plan import DevicePlan, device_plan


def load_tokens(path: Path, limit: int | None = None, objective: str = "instruction") -> list[dict]:
    """Tokenised examples; with the ``completion`` objective every token after the first is trained."""
    rows = read_jsonl(path)[:limit] if limit else read_jsonl(path)
    if objective in PREFERENCE_OBJECTIVES:
        from ftkit.train.preference import preference_rows

        return preference_rows(rows, objective)
    if objective == "completion":
        return [{"input_ids": r["input_ids"], "labels": [IGNORE_INDEX] + r["input_ids"][1:]} for r in rows]
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]


def set_seed(seed: int, deterministic: bool = False) -> None:
    from transformers import enable_full_determinism
    from transformers import set_seed as hf_set_seed

    if deterministic:
        enable_full_determinism(seed)
    else:
        hf_set_seed(seed)


def _sampling_args(group_by_length: bool) -> dict:
    """transformers 5 renamed group_by_length to train_sampling_strategy; support both."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    if "train_sampling_strategy" in names:
        return {"train_sampling_strategy": "group_by_length" if group_by_length else "random"}
    return {"group_by_length": group_by_length}


def build_trainer(cfg: ExperimentConfig, paths: RunPaths, model, tokenizer, train_rows, val_rows,
                  plan: DevicePlan | None = None, recipe=None):
    """A configured transformers Trainer; kept separate so tests can inspect it.

    ``plan``: :func:`device_plan`'s choices (micro-batches sized by :func:`fold_accumulation`)."""
    from transformers import Trainer, TrainingArguments

    from ftkit.train.lean_trainer import LeanTrainer
    from ftkit.train.recipe import DEFAULT

    recipe = recipe or DEFAULT
    plan = plan or device_plan(cfg)
    args = TrainingArguments(**training_arguments(cfg, paths, model, bool(val_rows), plan))
    args.warmup_steps = planned_warmup(cfg, len(train_rows), plan, args.world_size)
    trainer_class = LeanTrainer if plan.device == "cuda" and recipe.lean_trainer else Trainer
    trainer = trainer_class(
        model=model,
        callbacks=callbacks(cfg),
        args=args,
        train_dataset=TokenizedDataset(train_rows),
        eval_dataset=TokenizedDataset(val_rows) if val_rows else None,
        data_collator=recipe.collator(tokenizer.pad_token_id, cfg.train.packing,
                                      boundaries=plan.attention == "varlen",
                                      trained_logits_only=bool(plan.applied and plan.applied.trained_logits_only)),
    )
    return recipe.trainer(quiet_when_headless(trainer))


def training_arguments(cfg: ExperimentConfig, paths: RunPaths, model, has_val: bool, plan: DevicePlan) -> dict:
    """The TrainingArguments of stage 03 as keywords (the preference trainers' configs take the same)."""
    t = cfg.train
    device = resolve_device(cfg.model)
    return dict(
        output_dir=str(paths.checkpoints_dir),
        per_device_train_batch_size=plan.micro_batch,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=plan.accumulation,
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=0,  # set below, once the number of processes is known
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if t.eval_steps > 0 and has_val else "no",
        eval_steps=t.eval_steps or None,
        save_strategy="steps" if t.save_steps > 0 else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        load_best_model_at_end=bool(t.early_stopping_patience) and t.save_steps > 0,
        metric_for_best_model="eval_loss" if t.early_stopping_patience else None,
        report_to=t.report_to or "none",
        include_num_input_tokens_seen=True,
        # a nan/inf loss is logged as it is: the Trainer's filter would hide it, and its check reads
        # the loss back to the host after every micro-batch, which leaves a GPU idle between steps
        logging_nan_inf_filter=False,
        seed=cfg.seed,
        data_seed=cfg.seed,
        full_determinism=t.deterministic,
        optim=plan.optimizer,
        **_checkpointing_args(plan.gradient_checkpointing),
        **_sampling_args(t.group_by_length),
        neftune_noise_alpha=t.neftune_noise_alpha,
        use_cpu=device.type == "cpu",
        bf16=next(model.parameters()).dtype == torch.bfloat16,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        # batches are copied to the GPU from pinned memory without waiting: a blocking copy makes the
        # host wait for the previous step's kernels, and the GPU then waits for the host to launch more
        dataloader_pin_memory=device.type == "cuda",
        accelerator_config={"non_blocking": device.type == "cuda"},
        # headless (make run, ftkit run) the progress lines of ftkit.train.progress say how training goes:
        # tqdm's bar would add carriage-return lines to a terminal log (ftkit run); interactive, it stays
        disable_tqdm=os.environ.get("FTKIT_HEADLESS", "") not in ("", "0"),
    )


def planned_warmup(cfg: ExperimentConfig, examples: int, plan: DevicePlan, processes: int) -> int:
    """Warm-up as a whole number of steps: an int, worked out here, since transformers 5 reads a float < 1
    in warmup_steps as a ratio, 4.x as a number of steps (0), and neither has a ratio field read the same way."""
    t = cfg.train
    return warmup_steps(t.warmup_ratio, optimizer_steps(examples, plan.micro_batch, plan.accumulation, processes,
                                                        t.epochs, t.max_steps))


def callbacks(cfg: ExperimentConfig) -> list:
    """Complete-checkpoint markers, the progress lines and early stopping when configured."""
    from transformers import EarlyStoppingCallback

    from ftkit.train.progress import TrainingProgress

    out = [CompleteCheckpointMarker(), TrainingProgress()]
    if cfg.train.early_stopping_patience:
        out.append(EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience))
    return out


def quiet_when_headless(trainer):
    """Headless, the Trainer would print every log as a dict; the progress lines say it once per interval."""
    if trainer.args.disable_tqdm:
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer


def optimizer_steps(examples: int, micro_batch: int, accumulation: int, processes: int, epochs: float,
                    max_steps: int = -1) -> int:
    """The optimiser steps the Trainer takes: ``max_steps`` when positive, else ``epochs`` times the
    steps of one epoch, counted as transformers' Trainer counts them (each process gets
    ceil(examples / (micro_batch x processes)) micro-batches, the last one short; an epoch is
    ceil(micro-batches / accumulation) steps, at least one; epochs are rounded up to a whole step)."""
    if max_steps > 0:
        return max_steps
    micro_batches = math.ceil(examples / (micro_batch * processes))
    return math.ceil(epochs * max(math.ceil(micro_batches / accumulation), 1))


def warmup_steps(ratio: float, total_steps: int) -> int:
    """Warm-up steps for ``train.warmup_ratio``: ceil(ratio x total steps). The product is rounded to
    9 places first, so 0.07 x 100 (7.000000000000001 in floating point) gives 7 steps, not 8."""
    if not 0 <= ratio <= 1:
        raise ValueError(f"train.warmup_ratio: a share of the optimiser steps in [0, 1], got {ratio}")
    return math.ceil(round(ratio * total_steps, 9))


def _checkpointing_args(on: bool) -> dict:
    """Activation checkpointing for TrainingArguments under the name this transformers knows
    (``activation_checkpointing`` from 5.2x; ``gradient_checkpointing`` before, a deprecated alias since)."""
    import dataclasses

    from transformers import TrainingArguments

    name = "activation_checkpointing" if any(f.name == "activation_checkpointing"
                                             for f in dataclasses.fields(TrainingArguments)) else "gradient_checkpointing"
    return {name: on, f"{name}_kwargs": {"use_reentrant": False} if on else None}
