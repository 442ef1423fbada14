"""Stage 04: base, prompted base and tuned compared on held-out data, with paired intervals.

``run(cfg, paths)`` does the stage's work, writes its artifacts and ``metrics/NN_stage.json``, and
returns a :class:`EvaluateResult`; its notebook calls only that and displays."""

from ftkit.core.lazy import lazy_submodules
from ftkit.evaluate.stage import EvaluateResult, run

__all__ = ["EvaluateResult", "run"]
__getattr__ = lazy_submodules(__name__)
