"""The form's live estimate: memory, time and trainable share from :mod:`ftkit.core.estimate`,
on stage 02's token counts when the experiment has them."""

from __future__ import annotations

import functools
from pathlib import Path

from ftkit.core.config import DEMO_DATA, ExperimentConfig


@functools.lru_cache(maxsize=8)
def _lengths(path: str, mtime: float) -> tuple[int, ...]:
    from ftkit.core.files import iter_jsonl

    return tuple(len(r["input_ids"]) for r in iter_jsonl(Path(path)))


def train_lengths(cfg: ExperimentConfig) -> tuple[list[int], str]:
    """Token counts of the training examples and where they came from: stage 02's tokens of this
    experiment, or an assumption said in the line (half of max_seq_len per example)."""
    from ftkit.core.paths import RunPaths, resolve_outputs_dir

    tokens = RunPaths(resolve_outputs_dir(cfg.outputs_dir), cfg.experiment).tokens("train")
    if tokens.exists():
        return list(_lengths(str(tokens), tokens.stat().st_mtime)), "stage 02's token counts"
    n = int(cfg.data.demo_size * (1 - cfg.data.val_fraction - cfg.data.test_fraction)) if cfg.data.path == DEMO_DATA \
        else 1000
    half = cfg.convert.max_seq_len // 2
    return [half] * max(n, 1), f"assumed {n:,} examples of {half} tokens (stage 02 not run for this experiment)"


def estimate_line(cfg: ExperimentConfig) -> str:
    """One HTML line: memory, time, trainable share, hosted cost."""
    from ftkit.core.estimate import estimate
    from ftkit.core.modeling import resolve_model_path

    lengths, source = train_lengths(cfg)
    est = estimate(cfg, resolve_model_path(cfg.model.name), sum(lengths), len(lengths), sum(lengths) / len(lengths))
    minutes = est.est_train_seconds / 60
    share = 100 * est.trainable_parameters / max(est.parameters, 1)
    return (f"<span class='ftkit-estimate'>estimate: ~{est.total_gb:.2f} GB on {est.device} (weights "
            f"{est.weights_gb:.2f}, training state {est.trainable_state_gb:.2f}, activations {est.activations_gb:.2f})"
            f" · ~{minutes:.1f} min for {est.train_tokens:,} tokens · trainable {est.trainable_parameters:,} of "
            f"{est.parameters:,} ({share:.2f}%) · {source}</span>")
