"""What a person at a notebook sees beyond the reports: the hyperparameter form (and, in stage 03,
the live training view that ``ftkit.train`` shows). Nothing here is built in a headless run."""

from __future__ import annotations

from ftkit.core.config import ExperimentConfig
from ftkit.core.lazy import lazy_submodules
from ftkit.core.session import interactive


def form(cfg: ExperimentConfig, stage: str | None = None, force: bool = False):
    """The hyperparameter form for ``cfg`` with ``stage``'s section open, in interactive sessions
    (``force``: build it anyway); None in a headless run, which never imports ipywidgets."""
    if not (force or interactive()):
        return None
    from ftkit.ui.estimate_line import estimate_line
    from ftkit.ui.parameter_form import ParameterForm

    return ParameterForm(cfg, stage=stage, estimate=estimate_line).widget


__getattr__ = lazy_submodules(__name__)
