"""Stage 01 as one call: read, check, clean, de-duplicate and split your records (``run``)."""

from __future__ import annotations

from dataclasses import dataclass

from ftkit.core.config import ExperimentConfig
from ftkit.core.files import write_json
from ftkit.core.paths import RunPaths
from ftkit.data.dataset import PrepResult, prepare

STAGE = "01_data_prep"


@dataclass
class DataResult:
    prepared: PrepResult  # the splits' statistics, a sample, the quarantine
    general: dict  # the forgetting guard: general records mixed into train (data.general_mix)
    metrics: dict  # what metrics/01_data_prep.json holds


def run(cfg: ExperimentConfig, paths: RunPaths) -> DataResult:
    """Stage 01: the splits under ``data/`` (general replay records mixed in when configured) and the metrics."""
    from ftkit.core import replay

    with paths.stage(STAGE, after=None):
        prepared = prepare(cfg.data, paths, cfg.seed)
        general = replay.mix_general(cfg, paths, prepared)
        metrics = prepared.metrics()
        paths.write_metrics(STAGE, metrics)
        write_json(paths.config_record, cfg.to_dict())  # what later runs are compared on
        paths.finish(STAGE, [*(paths.split(n) for n in ("train", "val", "test")), paths.quarantine], after=None)
    return DataResult(prepared, general, metrics)
