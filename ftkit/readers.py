"""Read training data from whatever a company exports, one record at a time, with its location.

Supported: JSONL/NDJSON, JSON (a list, or ``{"data": [...]}``), CSV/TSV, Parquet, a ``datasets``
directory saved with ``save_to_disk``, plain text (``.txt``/``.md``: one record per blank-line
separated block, for completion tuning), several files or a folder of them. UTF-8 with or
without a byte-order mark. Line-based and columnar files are streamed (Parquet in record
batches, a ``datasets`` directory memory-mapped), so a million-record file is never held as
Python objects all at once.

Each record comes as a :class:`Located` with ``where`` = ``file:line N`` (JSONL, text),
``file:row N`` (CSV/TSV, Parquet, datasets; 1-based data rows) or ``file:item N`` (JSON). A
record that cannot be read at all (invalid JSON, not an object) comes with ``error`` set
instead of raising, so the caller can quarantine it and carry on.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
            ".parquet": "parquet", ".txt": "text", ".md": "text"}


@dataclass
class Located:
    where: str
    record: dict[str, Any] | None
    error: str | None = None


class InputError(ValueError):
    """A path that cannot be read as training data at all."""


def expand(paths: str | Path | list) -> list[Path]:
    """Files behind ``paths``: a file, a folder (its data files, sorted; a saved ``datasets``
    directory counts as one input), a glob, or a list of those."""
    items = paths if isinstance(paths, (list, tuple)) else [paths]
    out: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if any(ch in str(item) for ch in "*?["):
            matches = sorted(Path().glob(str(item))) if not p.is_absolute() else sorted(Path(p.anchor).glob(str(p)[1:]))
            if not matches:
                raise InputError(f"{item}: the pattern matches no file")
            out += [m for m in matches if m.is_file() or is_datasets_dir(m)]
        elif is_datasets_dir(p):
            out.append(p)
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
            found += sorted(d for d in p.rglob("*") if d.is_dir() and is_datasets_dir(d))
            if not found:
                raise InputError(f"{p}: the folder holds no data file ({', '.join(sorted(SUFFIXES))})")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise InputError(f"{p}: no such file or folder; check data.path")
    return out


def is_datasets_dir(p: Path) -> bool:
    return p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists())


def file_kind(p: Path) -> str:
    if is_datasets_dir(p):
        return "datasets"
    kind = SUFFIXES.get(p.suffix.lower())
    if kind is None:
        raise InputError(f"{p}: unsupported file type '{p.suffix}'; use one of {', '.join(sorted(SUFFIXES))}, "
                         "or a datasets directory")
    return kind


def iter_records(paths) -> Iterator[Located]:
    """Every record of every input, in order, streamed."""
    for p in expand(paths):
        yield from _READERS[file_kind(p)](p)


def _jsonl(p: Path) -> Iterator[Located]:
    with open(p, encoding="utf-8-sig", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p}:line {i}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield Located(where, None, f"invalid JSON ({e.msg} at column {e.colno}); fix or remove the line")
                continue
            yield _object(where, obj)


def _object(where: str, obj: Any) -> Located:
    if isinstance(obj, dict):
        return Located(where, obj)
    return Located(where, None, f"expected a JSON object per record, got {type(obj).__name__}")


def _json(p: Path) -> Iterator[Located]:
    try:
        data = json.loads(p.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        yield Located(f"{p}:line {e.lineno}", None, f"invalid JSON ({e.msg} at column {e.colno}); the whole file "
                      "is unreadable until this is fixed")
        return
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        yield Located(str(p), None, 'expected a JSON list of records or {"data": [...]}')
        return
    for i, obj in enumerate(data, 1):
        yield _object(f"{p}:item {i}", obj)


def _csv(p: Path, delimiter: str = ",") -> Iterator[Located]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(p, newline="", encoding="utf-8-sig", errors="replace") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        for i, row in enumerate(reader, 1):
            if None in row:  # more cells than header columns
                yield Located(f"{p}:row {i}", None, f"{len(row[None])} more cell(s) than the header has columns "
                              "(an unquoted delimiter?)")
                continue
            yield Located(f"{p}:row {i}", dict(row))


def _tsv(p: Path) -> Iterator[Located]:
    return _csv(p, "\t")


def _parquet(p: Path) -> Iterator[Located]:
    import pyarrow.parquet as pq

    i = 0
    for batch in pq.ParquetFile(p).iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            i += 1
            yield Located(f"{p}:row {i}", row)


def _datasets(p: Path) -> Iterator[Located]:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(p))  # memory-mapped Arrow
    parts = ds.items() if isinstance(ds, DatasetDict) else [(None, ds)]
    for split, d in parts:
        label = f"{p}[{split}]" if split else str(p)
        for i, row in enumerate(d, 1):
            yield Located(f"{label}:row {i}", row)


def _text(p: Path) -> Iterator[Located]:
    block, start = [], 0
    with open(p, encoding="utf-8-sig", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                if not block:
                    start = i
                block.append(line.rstrip("\n"))
            elif block:
                yield Located(f"{p}:line {start}", {"text": "\n".join(block)})
                block = []
    if block:
        yield Located(f"{p}:line {start}", {"text": "\n".join(block)})


_READERS = {"jsonl": _jsonl, "json": _json, "csv": _csv, "tsv": _tsv, "parquet": _parquet, "datasets": _datasets,
            "text": _text}
