"""Stage 03: full fine-tuning, LoRA, DoRA or QLoRA on the transformers Trainer, on one device or several.

``run(cfg, paths)`` does the stage's work, writes its artifacts and ``metrics/NN_stage.json``, and
returns a :class:`TrainResult`; its notebook calls only that and displays."""

from ftkit.core.lazy import lazy_submodules
from ftkit.train.stage import TrainResult, run

__all__ = ["TrainResult", "run"]
__getattr__ = lazy_submodules(__name__)
