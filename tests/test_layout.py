"""The code's shape: dependencies one way (import-linter), small modules, short notebook cells, a benchmark
that uses ftkit's public names only, and a configuration reference that matches the code."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 400
MAX_CELL_LINES = 4


def test_configuration_reference_is_current():
    from ftkit.core import config_reference

    assert (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8") == config_reference.markdown(), \
        "docs/configuration.md is stale: run make docs"


def test_configuration_reference_lists_every_key():
    import dataclasses
    import typing

    from ftkit.core import config_reference
    from ftkit.core.config import ExperimentConfig

    text = config_reference.markdown()

    def keys(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from keys(hints[f.name], f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"

    missing = [k for k in keys(ExperimentConfig) if f"| `{k}` |" not in text]
    assert not missing and len(list(keys(ExperimentConfig))) > 100, missing


def test_import_contracts_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 kept, 0 broken" in proc.stdout


def test_modules_are_small_or_say_why():
    long = []
    for p in sorted((ROOT / "ftkit").rglob("*.py")):
        n = len(p.read_text(encoding="utf-8").splitlines())
        doc = ast.get_docstring(ast.parse(p.read_text(encoding="utf-8"))) or ""
        if n > MAX_LINES and "One module because" not in doc:
            long.append(f"{p.relative_to(ROOT)}: {n} lines")
    assert not long, long


def test_notebook_cells_only_call_and_display():
    """Every code cell but the parameters cell is a few lines: the stage's run and what to show."""
    long = []
    for p in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for k, c in enumerate(json.loads(p.read_text(encoding="utf-8"))["cells"]):
            if c["cell_type"] == "code" and "parameters" not in c.get("metadata", {}).get("tags", []):
                lines = [ln for ln in "".join(c["source"]).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
                if len(lines) > MAX_CELL_LINES:
                    long.append(f"{p.name} cell {k}: {len(lines)} lines")
        assert "ftkit.report" in p.read_text(encoding="utf-8")
    assert not long, long


def test_every_stage_has_one_run():
    import inspect

    import ftkit

    for stage in ("data", "convert", "train", "evaluate", "host"):
        run = getattr(ftkit, stage).run
        assert list(inspect.signature(run).parameters)[:2] == ["cfg", "paths"], stage


def test_benchmarks_use_public_names_only():
    private = []
    for p in sorted((ROOT / "bench").glob("*.py")):
        tree = ast.parse(p.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ftkit"):
                private += [f"{p.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
        # module attributes of ftkit set from outside (the patching the Recipe replaces)
        text = p.read_text(encoding="utf-8")
        private += [f"{p.name}: {m}" for m in re.findall(r"\bftkit\.[\w.]*\._\w+", text)]
    assert not private, private
