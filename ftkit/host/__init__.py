"""Stage 05: the merged model served behind an OpenAI-compatible API, checked, measured and exported.

``run(cfg, paths)`` does the stage's work, writes its artifacts and ``metrics/NN_stage.json``, and
returns a :class:`HostResult`; its notebook calls only that and displays."""

from ftkit.core.lazy import lazy_submodules
from ftkit.host.stage import HostResult, run

__all__ = ["HostResult", "run"]
__getattr__ = lazy_submodules(__name__)
