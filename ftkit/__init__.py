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
    the run's paths, and the plotting style. Returns ``(cfg, paths)``.

    In an interactive session ``parameters/<experiment>.yaml``, when it exists, is read first and the
    cell's values go on top, so a notebook run by hand runs what ``make run EXP=<experiment>`` runs
    (papermill has already put the file's values into the cell in a headless run)."""
    from ftkit.core.session import in_colab, interactive, project_root
    from ftkit.report.common import setup_notebook

    base, source = {}, None
    params_file = project_root() / "parameters" / f"{experiment}.yaml"
    if interactive() and params_file.is_file():
        from ftkit.core.config import read_yaml

        base, source = read_yaml(params_file), str(params_file.relative_to(project_root()))
        print(f"{source} read first (interactive session); the parameters cell's values go on top")
    if in_colab():  # data.path: upload, or a file on Google Drive
        from ftkit.core.paths import resolve_outputs_dir
        from ftkit.ui.colab import resolve_data_path

        data = resolve_data_path(data or {}, resolve_outputs_dir(outputs_dir) / experiment / "upload")
    defaults = ExperimentConfig()
    top = {k: v for k, v in (("seed", seed), ("outputs_dir", outputs_dir)) if not base or v != getattr(defaults, k)}
    cfg = load_config(base, experiment=experiment, **top, model=model or {}, data=data or {}, convert=convert or {},
                      train=train or {}, evaluate=evaluate or {}, host=host or {}, overrides=overrides or {},
                      source=source)
    setup_notebook()
    return cfg, run_paths(cfg)


__getattr__ = lazy_submodules(__name__)
