"""Stage 01: your records read, checked, cleaned, de-duplicated and split.

``run(cfg, paths)`` does the stage's work, writes its artifacts and ``metrics/NN_stage.json``, and
returns a :class:`DataResult`; its notebook calls only that and displays."""

from ftkit.core.lazy import lazy_submodules
from ftkit.data.stage import DataResult, run

__all__ = ["DataResult", "run"]
__getattr__ = lazy_submodules(__name__)
