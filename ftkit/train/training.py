"""Stage 03's training run: the model loaded, planned for its device, trained, saved and reported.

The labels built in stage 02 already mask everything but the assistant replies and their
end-of-turn token; the collator only pads (labels with -100, never by token id, so EOS stays
trained even where pad == EOS). The Trainer normalises the loss by the number of trained tokens
across the whole accumulated batch (``num_items_in_batch``).
"""

from __future__ import annotations

import logging
import math
import os
import time

import torch

from ftkit.core.config import PREFERENCE_OBJECTIVES, ExperimentConfig, init_adapter_path
from ftkit.core.files import write_json
from ftkit.core.modeling import (
    count_parameters,
    load_tokenizer,
    resolve_device,
    resolve_model_path,
)
from ftkit.core.paths import RunPaths
from ftkit.core.preference import step_tokens
from ftkit.core.trained import TRAIN_INFO
from ftkit.train.checkpoints import find_resume_checkpoint
from ftkit.train.history import overfitting, write_log_csv
from ftkit.train.loading import free_leftovers, load_for_training, peak_memory_mb
from ftkit.train.packing import check_packing
from ftkit.train.plan import device_plan, fold_for_model
from ftkit.train.trainer import build_trainer, load_tokens, set_seed

log = logging.getLogger("ftkit")


def train(cfg: ExperimentConfig, paths: RunPaths) -> dict:
    """Run stage 03: LoRA training, adapter saved to ``paths.adapter_dir``; returns metrics."""
    return run_training(cfg, paths)[1]


def run_training(cfg: ExperimentConfig, paths: RunPaths, recipe=None):
    """Stage 03, returning ``(trainer, metrics)`` so callers can inspect the trained model. ``recipe``: a
    :class:`ftkit.train.recipe.Recipe` whose pieces replace stage 03's (the benchmark's)."""
    from ftkit.train.recipe import DEFAULT

    recipe = recipe or DEFAULT
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = resolve_device(cfg.model)
    held_before = free_leftovers(device)
    set_seed(cfg.seed, cfg.train.deterministic)
    base_path = resolve_model_path(cfg.model.name)
    tokenizer = load_tokenizer(paths.require(paths.tokenizer_dir, "02_format_conversion"), cfg.model)
    objective = cfg.train.objective
    preference = objective in PREFERENCE_OBJECTIVES
    train_rows = load_tokens(paths.require(paths.tokens("train"), "02_format_conversion"), objective=objective)
    val_rows = load_tokens(paths.require(paths.tokens("val"), "02_format_conversion"), cfg.train.max_eval_examples,
                           objective=objective)
    if preference:
        from ftkit.train.preference import need_preference_data

        need_preference_data(train_rows, objective, str(paths.tokens("train")))
    from ftkit.core.estimate import preflight

    # before any weight is loaded: stops early if it clearly won't fit. A preference row goes through the
    # policy as one (a pair: its chosen and rejected sequences, side by side in the batch); the estimate
    # adds the time of DPO's and KTO's reference forward
    lengths = [step_tokens(r) for r in train_rows]
    pre = preflight(cfg, paths, lengths=lengths, check=recipe.check_fits)
    log.info("pre-flight: ~%.2f GB needed of %.1f GB free, ~%.0f s estimated", pre["total_gb"], pre["free_gb"],
             pre["est_train_seconds"])
    # what stage 04 will cost after this training: stage 02 planned it from the same estimate
    converted = paths.metrics("02_format_conversion")
    evaluation = (paths.read_metrics("02_format_conversion").get("estimate_evaluate") if converted.exists() else None) or {}
    if evaluation.get("est_total_s") is not None:
        log.info("pre-flight: stage 04 ~%.0f s after it (%s)", evaluation["est_total_s"], evaluation["reason"])
    free = int(pre["free_gb"] * 1024**3)
    if cfg.train.max_memory_gb is not None and device.type == "cuda":
        # the budget enforced, not only planned for: going over it is an out-of-memory error
        index = device.index if device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cfg.train.max_memory_gb * 1024**3 / total), index)
    planned = device_plan(cfg, pre["est_train_seconds"])
    model, applied = load_for_training(cfg, base_path, planned, recipe)
    choices = fold_for_model(cfg, planned, applied, lengths, free)
    load_peak = peak_memory_mb(device)  # loading can peak above training (QLoRA quantises as it loads)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    log.info("device plan: %s", choices.to_dict())
    packing_leak_max = check_packing(model) if cfg.train.packing and not preference else None
    trainable, total = count_parameters(model)
    log.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    if preference:
        from ftkit.train.preference import build_preference_trainer

        trainer = build_preference_trainer(cfg, paths, model, tokenizer, train_rows, val_rows, choices, recipe)
    else:
        trainer = build_trainer(cfg, paths, model, tokenizer, train_rows, val_rows, choices, recipe)
    start = time.perf_counter()
    resume_from = find_resume_checkpoint(paths.checkpoints_dir, cfg.train.resume)
    if resume_from:
        log.info("resuming from %s", resume_from)
    from ftkit.core.session import interactive
    from ftkit.train.live import watched

    with watched(trainer, paths.stop_request, interactive() and trainer.is_world_process_zero()) as stop:
        try:
            result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except Exception as e:  # a checkpoint that did not fit: say so, with its size (the torn one is never resumed)
            from ftkit.core.files import disk_full_error

            full = disk_full_error(paths.checkpoints_dir, checkpoint_bytes(model, paths.checkpoints_dir), e)
            if full is None:
                raise
            raise full from e
    seconds = time.perf_counter() - start
    final_eval = _final_eval(trainer) if val_rows else {}

    save_adapter(trainer, tokenizer, paths, {"base_model": cfg.model.name, "base_path": base_path,
                                             "method": cfg.train.method, "objective": cfg.train.objective,
                                             "init_adapter": init_adapter_path(cfg)})
    if trainer.is_world_process_zero():
        write_json(paths.train_log, trainer.state.log_history)
    if trainer.args.world_size > 1:  # every rank records what it ended with, so agreement can be checked
        trained = [p.detach().float() for p in trainer.model.parameters() if p.requires_grad]
        write_json(paths.rank_log(trainer.args.process_index), {
            "rank": trainer.args.process_index, "world_size": trainer.args.world_size,
            "trainable_sum": float(sum(p.sum() for p in trained)), "trainable_abs_sum": float(sum(p.abs().sum() for p in trained)),
            "global_step": trainer.state.global_step})
    history = trainer.state.log_history

    steps = trainer.state.global_step
    batch = cfg.train.batch_size * cfg.train.gradient_accumulation_steps
    seen = min(steps * batch, len(train_rows) * math.ceil(max(cfg.train.epochs, 1)))
    tokens = int(getattr(trainer.state, "num_input_tokens_seen", 0) or
                 sum(lengths) * seen / max(len(train_rows), 1))
    losses = [h["loss"] for h in history if "loss" in h]
    train_peak = peak_memory_mb(device)
    if trainer.is_world_process_zero():
        write_log_csv(history, paths.train_log.with_suffix(".csv"))
    return trainer, {
        "train_loss": result.training_loss,
        "eval_loss": final_eval.get("eval_loss"),
        "train_tokens": tokens,
        "peak_memory_mb": max(load_peak, train_peak),
        "load_peak_memory_mb": load_peak,
        "memory_held_before_mb": held_before,
        "train_peak_memory_mb": train_peak if device.type == "cuda" else None,
        "trainable_params": trainable,
        "total_params": total,
        "runtime_s": seconds,
        "overfitting": overfitting(history),
        "checkpoints": sorted(str(p) for p in paths.checkpoints_dir.glob("checkpoint-*")),
        "method": cfg.train.method,
        "base_model": cfg.model.name,
        "trust_remote_code": cfg.model.trust_remote_code,
        "allow_pickle_weights": cfg.model.allow_pickle_weights,
        "train_examples": len(train_rows),
        "steps": steps,
        "epochs_done": trainer.state.epoch,
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "train_loss_mean": result.training_loss,
        "val_loss": final_eval.get("eval_loss"),
        "tokens_per_second": tokens / seconds if seconds else None,
        "device": str(resolve_device(cfg.model)),
        "resumed_from": str(resume_from) if resume_from else None,
        "stopped_at_step": stop.stopped_at,  # a stop request ended the run there (the next run resumes)
        "planned_steps": trainer.state.max_steps,
        "steps_this_run": steps - (int(resume_from.name.split("-")[-1]) if resume_from else 0),
        "preflight": pre,
        "packing": cfg.train.packing and not preference,
        "objective": objective,
        "init_adapter": init_adapter_path(cfg),
        **({"preference": preference_summary(history)} if preference else {}),
        "packing_leak_max_logit_diff": packing_leak_max,
        "device_plan": choices.to_dict(),
    }


def preference_summary(history: list[dict]) -> dict:
    """The last logged preference figures of training and of validation (TRL's rewards/… and logps/…)."""
    out = {}
    for prefix in ("", "eval_"):
        last = next((h for h in reversed(history) if f"{prefix}rewards/margins" in h), None)
        if last:
            out["validation" if prefix else "train"] = {k[len(prefix):]: v for k, v in last.items()
                                                        if k.startswith(f"{prefix}rewards/") or k.startswith(f"{prefix}logps/")}
    return out


def _final_eval(trainer) -> dict:
    """The validation loss of the trained weights: the Trainer's own evaluation at the last step when it
    made one (``eval_steps`` divides the steps; the demo's 22 s on 2 cores), else a new one."""
    state = trainer.state
    last = next((h for h in reversed(state.log_history) if "eval_loss" in h), None)
    # (with early stopping the best checkpoint's weights are loaded at the end: evaluated anew)
    if last is not None and last.get("step") == state.global_step and not trainer.args.load_best_model_at_end:
        return {"eval_loss": last["eval_loss"]}
    return trainer.evaluate()


def save_adapter(trainer, tokenizer, paths, info: dict) -> None:
    """The adapter (the whole model for ``full``), its tokenizer and TRAIN_INFO, written to a staging folder
    beside ``adapter/`` and swapped in whole: a run killed while saving leaves the previous adapter or none,
    never a mix (no stale files from an earlier run with another method either). Every process takes part
    in ``save_model`` (it gathers sharded weights); the main process writes."""
    import shutil

    from ftkit.core.files import atomic

    staging = paths.adapter_dir.with_name(f".{paths.adapter_dir.name}.saving.tmp")
    if trainer.is_world_process_zero():
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(staging)
        write_json(staging / TRAIN_INFO, info)
        with atomic(paths.adapter_dir, directory=True) as tmp:
            tmp.rmdir()
            os.replace(staging, tmp)
    trainer.accelerator.wait_for_everyone()


def checkpoint_bytes(model, checkpoints_dir) -> int:
    """What one more checkpoint takes on disk: the newest complete one's size, else the trained weights
    with AdamW's two moments (the whole model's weights too for a full fine-tune)."""
    from ftkit.train.checkpoints import COMPLETE_MARKER

    done = [d for d in checkpoints_dir.glob("checkpoint-*") if (d / COMPLETE_MARKER).exists()]
    if done:
        newest = max(done, key=lambda d: d.stat().st_mtime)
        return sum(f.stat().st_size for f in newest.rglob("*") if f.is_file())
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return trained + 2 * sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)

