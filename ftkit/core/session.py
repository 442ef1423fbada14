"""Where a notebook runs: a person at JupyterLab, VS Code or Colab, or a headless papermill run.

Widgets (the hyperparameter form, the live training view) are built only for a person: a headless
run must never build or wait on one. papermill (through nbclient) sends every cell with
``allow_stdin: false``, because nobody is there to answer ``input()``; a notebook front end sends
``true``. ``FTKIT_HEADLESS=1`` (set by the Makefile and ``ftkit run``) decides it outright.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HEADLESS_ENV = "FTKIT_HEADLESS"


def in_colab() -> bool:
    return "google.colab" in sys.modules


def interactive() -> bool:
    """True in a notebook a person is looking at; False headless, in scripts and in tests."""
    if os.environ.get(HEADLESS_ENV, "") not in ("", "0"):
        return False
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython else None
    kernel = getattr(shell, "kernel", None)
    if kernel is None:  # a terminal IPython or plain Python: no widgets to show
        return False
    if in_colab():
        return True
    parent = kernel.get_parent("shell") if hasattr(kernel, "get_parent") else getattr(kernel, "_parent_header", {})
    return bool((parent or {}).get("content", {}).get("allow_stdin", False))


def project_root(start: Path | None = None) -> Path:
    """The folder holding notebooks/ and parameters/ (where `make` runs), from ``start`` or the cwd
    upwards; the cwd itself when none is found."""
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "notebooks").is_dir() and (d / "parameters").is_dir():
            return d
    return here
