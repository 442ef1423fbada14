"""The five stages in order, without papermill: what ``ftkit run PARAMS --stages 01-05`` calls.

Each stage is ``ftkit.<stage>.run(cfg, paths)``, the function its notebook calls; stages hand off
through files under ``outputs/<experiment>/``, so any later stage can run alone once the earlier ones
have.
"""

from __future__ import annotations

import importlib
import logging
import time

from ftkit.core.config import ExperimentConfig
from ftkit.core.paths import RunPaths

log = logging.getLogger(__name__)

STAGES = {"01": ("01_data_prep", "ftkit.data"), "02": ("02_format_conversion", "ftkit.convert"),
          "03": ("03_train", "ftkit.train"), "04": ("04_evaluate", "ftkit.evaluate"), "05": ("05_host", "ftkit.host")}


class StageSpecError(ValueError):
    pass


def parse_stages(spec: str) -> list[str]:
    """``01-05``, ``2-4``, ``01,03`` or ``03`` → the stage numbers, in order."""
    numbers: set[str] = set()
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise StageSpecError(f"--stages {spec!r}: expected numbers like 01-05 or 01,03") from None
        if not (1 <= a <= b <= 5):
            raise StageSpecError(f"--stages {spec!r}: stages run from 01 to 05, in order")
        numbers.update(f"{k:02d}" for k in range(a, b + 1))
    if not numbers:
        raise StageSpecError(f"--stages {spec!r}: name at least one stage")
    return sorted(numbers)


def run(cfg: ExperimentConfig, paths: RunPaths, stages: list[str]) -> dict[str, object]:
    """Run ``stages`` in order; each stage's result by its name (``01_data_prep``…)."""
    results: dict[str, object] = {}
    for number in stages:
        name, module = STAGES[number]
        t0 = time.perf_counter()
        log.info("stage %s: %s", name, module)
        results[name] = importlib.import_module(module).run(cfg, paths)
        log.info("stage %s done in %.0f s: %s", name, time.perf_counter() - t0, paths.metrics(name))
    return results
