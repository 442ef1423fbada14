"""Stage 03 as one call: fine-tune on stage 02's tokens, here or through ``accelerate launch`` (``run``)."""

from __future__ import annotations

from dataclasses import dataclass

from ftkit.core.config import ExperimentConfig
from ftkit.core.files import read_json
from ftkit.core.paths import RunPaths

STAGE = "03_train"


@dataclass
class TrainResult:
    metrics: dict  # what metrics/03_train.json holds
    history: list[dict]  # the Trainer's log: losses, learning rate, per step


def run(cfg: ExperimentConfig, paths: RunPaths) -> TrainResult:
    """Stage 03: the adapter (or full weights) under ``model/``, the training log and the metrics."""
    from ftkit.train.launch import train

    with paths.stage(STAGE, after="02_format_conversion"):  # checkpoints stay: a killed run resumes from them
        metrics = train(cfg, paths)
        paths.write_metrics(STAGE, metrics)
        paths.finish(STAGE, [paths.adapter_dir, paths.train_log], after="02_format_conversion")
    return TrainResult(metrics, read_json(paths.train_log))
