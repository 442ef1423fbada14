"""ftkit: fine-tune an open language model on your own data, through five report notebooks."""

import logging as _logging

from ftkit.core.config import ConfigError, ExperimentConfig, load_config
from ftkit.core.lazy import lazy_submodules
from ftkit.core.paths import RunPaths

__all__ = ["ConfigError", "ExperimentConfig", "RunPaths", "load_config", "run_paths", "start"]
__version__ = "0.1.0"

_logging.getLogger("ftkit").addHandler(_logging.NullHandler())
# peft imports bitsandbytes, whose CPU backend warns about an optional kernels package at import.
_logging.getLogger("bitsandbytes").setLevel(_logging.ERROR)


def run_paths(cfg: ExperimentConfig) -> RunPaths:
    """The artifact paths of ``cfg``'s experiment (relative outputs_dir resolved at the project root)."""
    from ftkit.core.paths import resolve_outputs_dir

    return RunPaths(resolve_outputs_dir(cfg.outputs_dir), cfg.experiment)



def start(experiment: str = "demo", seed: int = 42, outputs_dir: str = "outputs", model=None, data=None,
          convert=None, train=None, evaluate=None, host=None, overrides=None):
    """A notebook's first step: its parameters validated into one config (every problem reported at once),
    the run's paths, and the plotting style. Returns ``(cfg, paths)``."""
    from ftkit.report.common import setup_notebook

    cfg = load_config(experiment=experiment, seed=seed, outputs_dir=outputs_dir, model=model or {}, data=data or {},
                      convert=convert or {}, train=train or {}, evaluate=evaluate or {}, host=host or {},
                      overrides=overrides or {})
    setup_notebook()
    return cfg, run_paths(cfg)


__getattr__ = lazy_submodules(__name__)
