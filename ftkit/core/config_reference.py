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


def _attribute_docs(cls) -> dict[str, str]:
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


def _rows(cls, prefix: str, out: list[str], nested: list) -> None:
    hints = typing.get_type_hints(cls)
    docs = _attribute_docs(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            nested.append((f"{prefix}{f.name}", hint))
            continue
        doc = " ".join(docs.get(f.name, "").split()).replace("|", "\\|")
        out.append(f"| `{prefix}{f.name}` | {_type(hint)} | {_fmt(_default(f))} | {doc} |")


def markdown() -> str:
    parts = [HEADER]
    top = _config.ExperimentConfig
    hints = typing.get_type_hints(top)
    plain = [f for f in dataclasses.fields(top) if not dataclasses.is_dataclass(hints[f.name])]
    rows: list[str] = []
    docs = _attribute_docs(top)
    for f in plain:
        rows.append(f"| `{f.name}` | {_type(hints[f.name])} | {_fmt(_default(f))} | "
                    f"{' '.join(docs.get(f.name, '').split())} |")
    parts.append("## Top level\n\n| key | type | default | meaning |\n|---|---|---|---|\n" + "\n".join(rows))
    queue = [(f.name, hints[f.name]) for f in dataclasses.fields(top) if dataclasses.is_dataclass(hints[f.name])]
    while queue:
        name, cls = queue.pop(0)
        rows, nested = [], []
        _rows(cls, f"{name}.", rows, nested)
        summary = inspect.cleandoc(cls.__doc__ or "")
        parts.append(f"## `{name}`\n\n{summary}\n\n| key | type | default | meaning |\n|---|---|---|---|\n"
                     + "\n".join(rows))
        queue[0:0] = nested
    return "\n\n".join(parts) + "\n"


def write(path: str | Path) -> Path:
    path = Path(path)
    path.write_text(markdown(), encoding="utf-8")
    return path
