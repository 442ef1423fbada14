"""What keeps a rendered report mailable: paths shown from the project or the outputs folder instead of
this machine's folders, log lines and progress bars kept out of a headless run's report, and the nbconvert template that
leaves out every script the default one loads from a CDN (``TEMPLATE``, used by the Makefile)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

# extends nbconvert's lab template; the Makefile passes it as --template-file
TEMPLATE = Path(__file__).with_name("mailable.html.j2")


def project_root() -> Path:
    """The folder holding notebooks/ and parameters/, from the working directory up (the directory itself
    when none is found): where `make` runs and what report paths are relative to."""
    here = Path.cwd().resolve()
    return next((d for d in (here, *here.parents) if (d / "notebooks").is_dir() and (d / "parameters").is_dir()),
                here)


def shown_path(path: str | Path, outputs_dir: str | Path | None = None) -> str:
    """A path as a report shows it: from the project root (``outputs/demo/merged``), else from the outputs
    folder (``<outputs>/demo/merged``; a run folder is one holding ``metrics/`` when ``outputs_dir`` is not
    given), else from the home folder (``~/.cache/...``); any other path as it is."""
    p = Path(os.path.abspath(path))
    root = project_root()
    if p.is_relative_to(root):
        return p.relative_to(root).as_posix() or "."
    outputs = Path(os.path.abspath(outputs_dir)) if outputs_dir else next(
        (d.parent for d in (p, *p.parents) if (d / "metrics").is_dir()), None)
    if outputs is not None and p.is_relative_to(outputs):
        return "/".join(("<outputs>", *p.relative_to(outputs).parts))
    home = Path.home()
    if p.is_relative_to(home) and home != Path(home.anchor):
        return "/".join(("~", *p.relative_to(home).parts))
    return str(path)


# an absolute path inside text: a slash not after a word, ":" (URLs) or another slash, up to a separator
_ABSOLUTE = re.compile(r"(?<![\w/:.~<>])/[^\s'\"<>:,;()\[\]{}`|]+")


def shown(text: str, outputs_dir: str | Path | None = None) -> str:
    """``text`` with every absolute path in it written as :func:`shown_path` writes it."""
    return _ABSOLUTE.sub(lambda m: shown_path(m.group(0), outputs_dir), text)


def shown_tree(tree, outputs_dir=None):
    """A config tree with :func:`shown` applied to every string in it."""
    if isinstance(tree, dict):
        return {k: shown_tree(v, outputs_dir) for k, v in tree.items()}
    if isinstance(tree, list):
        return [shown_tree(v, outputs_dir) for v in tree]
    return shown(tree, outputs_dir) if isinstance(tree, str) else tree


def headless() -> bool:
    """A papermill run under ``make`` (FTKIT_HEADLESS=1): its rendered report is what is kept and mailed."""
    return os.environ.get("FTKIT_HEADLESS") == "1"


def quiet_progress_bars() -> None:
    """No progress bars in a headless run: transformers' and huggingface_hub's bars become widgets in the
    notebook (a script and a widget-state blob in the HTML, an empty box once mailed) and say nothing
    the report does not. The variable covers libraries imported later, the calls those already imported."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def log_stream():
    """Where a report notebook's log lines go. A person at JupyterLab sees them in the cell. In a headless
    run (papermill under ``make``, FTKIT_HEADLESS=1) the rendered report is what is kept and mailed, and
    whatever a log line says that matters is in the report's own tables (the plan, the skipped exports),
    so they go to the terminal running it instead: ipykernel shows what is written to ``sys.stderr`` in the
    cell, but its ``fileno()`` is a copy of the kernel's own stderr, which papermill's process passed on."""
    if not headless():
        return sys.stderr
    try:
        return open(os.dup(sys.stderr.fileno()), "w", buffering=1, encoding="utf-8", errors="replace")
    except (OSError, ValueError, AttributeError):  # no file descriptor behind sys.stderr: keep it
        return sys.stderr
