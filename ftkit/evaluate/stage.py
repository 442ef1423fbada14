"""Stage 04 as one call: base, prompted base and tuned compared on the held-out split (``run``)."""

from __future__ import annotations

from dataclasses import dataclass

from ftkit.core.config import ExperimentConfig
from ftkit.core.files import read_json, read_jsonl
from ftkit.core.paths import RunPaths

STAGE = "04_evaluate"


@dataclass
class EvaluateResult:
    metrics: dict  # what metrics/04_evaluate.json holds
    generations: list[dict]  # every model's reply per test prompt, scored
    history: list[dict]  # stage 03's training log (the overfitting view)


def run(cfg: ExperimentConfig, paths: RunPaths) -> EvaluateResult:
    """Stage 04: ``eval/generations.jsonl`` and the metrics, with paired intervals and the verdict."""
    from ftkit.evaluate.evaluation import evaluate_run

    with paths.stage(STAGE, after="03_train"):
        metrics = evaluate_run(cfg, paths)
        paths.write_metrics(STAGE, metrics)
        paths.finish(STAGE, [paths.generations], after="03_train")
    return EvaluateResult(metrics, read_jsonl(paths.generations), read_json(paths.train_log))
