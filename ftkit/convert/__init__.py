"""Stage 02: the splits rendered with the model's chat template, masked to the assistant replies and tokenised.

``run(cfg, paths)`` does the stage's work, writes its artifacts and ``metrics/NN_stage.json``, and
returns a :class:`ConvertResult`; its notebook calls only that and displays."""

from ftkit.convert.stage import ConvertResult, run
from ftkit.core.lazy import lazy_submodules

__all__ = ["ConvertResult", "run"]
__getattr__ = lazy_submodules(__name__)
