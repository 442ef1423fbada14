"""The configuration reference (docs/configuration.md), generated from the config dataclasses themselves:
every key with its type, default and the docstring written under it in ftkit/core/config.py.

``make docs`` rewrites the file; a test fails when it is stale.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from pathlib import Path

from ftkit.core import config as _config

HEADER = """# Configuration reference

Generated from `ftkit/core/config.py` by `make docs` (`ftkit config-reference -o docs/configuration.md`);
do not edit by hand. A parameters file holds only the keys it changes, under these sections; the
defaults below are what a file that names nothing runs with. How parameters files work:
[parameters.md](parameters.md).
"""


def attribute_docs(cls) -> dict[str, str]:
    """The string literal written right under each field of ``cls`` (the attribute-docstring convention)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:] + [None], strict=True):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr) \
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return None if dataclasses.is_dataclass(value) else value
    return None


def _fmt(value) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`' if value else '`""`'
    return f"`{value!r}`"


def _type(hint) -> str:
    text = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
    return text.replace("|", "\\|")


def _section(cls, prefix: str) -> tuple[list[str], list]:
    """The table rows of ``cls``'s plain fields, and its nested sections (name, class) to document next."""
    hints, docs = typing.get_type_hints(cls), attribute_docs(cls)
    rows, nested = [], []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            nested.append((f"{prefix}{f.name}", hint))
            continue
        doc = " ".join(docs.get(f.name, "").split()).replace("|", "\\|")
        rows.append(f"| `{prefix}{f.name}` | {_type(hint)} | {_fmt(_default(f))} | {doc} |")
    return rows, nested


TABLE = "| key | type | default | meaning |\n|---|---|---|---|\n"


def markdown() -> str:
    rows, queue = _section(_config.ExperimentConfig, "")
    parts = [HEADER, "## Top level\n\n" + TABLE + "\n".join(rows)]
    while queue:
        name, cls = queue.pop(0)
        rows, nested = _section(cls, f"{name}.")
        parts.append(f"## `{name}`\n\n{inspect.cleandoc(cls.__doc__ or '')}\n\n" + TABLE + "\n".join(rows))
        queue[0:0] = nested
    return "\n\n".join(parts) + "\n"


def write(path: str | Path) -> Path:
    path = Path(path)
    path.write_text(markdown(), encoding="utf-8")
    return path
