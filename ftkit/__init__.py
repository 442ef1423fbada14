"""ftkit: fine-tune an open language model on your own data, through five report notebooks."""

import logging as _logging

from .config import ConfigError, ExperimentConfig, load_config
from .paths import RunPaths

__all__ = ["ConfigError", "ExperimentConfig", "RunPaths", "load_config", "run_paths"]
__version__ = "0.1.0"

_logging.getLogger("ftkit").addHandler(_logging.NullHandler())
# peft imports bitsandbytes, whose CPU backend warns about an optional kernels package at import.
_logging.getLogger("bitsandbytes").setLevel(_logging.ERROR)


def run_paths(cfg: ExperimentConfig) -> RunPaths:
    """The artifact paths of ``cfg``'s experiment (relative outputs_dir resolved at the project root)."""
    from .paths import resolve_outputs_dir

    return RunPaths(resolve_outputs_dir(cfg.outputs_dir), cfg.experiment)

_SUBMODULES = {"config", "paths", "demo_data", "readers", "formats", "cleaning", "data", "templates", "masking",
               "conversion", "estimate", "checker", "replay", "launch", "modeling", "train", "lean_trainer", "evaluate", "export", "serve",
               "server_process", "host", "report", "cli", "metrics", "judge", "eval_report",
               "gguf_export", "llama_cpp", "openai_job", "loadtest", "cost", "host_report"}


def __getattr__(name: str):
    """Import submodules on first use (``ftkit.train.train(...)``) so ``import ftkit`` stays light."""
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'ftkit' has no attribute {name!r}")
