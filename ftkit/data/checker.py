"""Validate and convert data files outside the notebooks (``ftkit validate``, ``ftkit convert``).

Every problem is one line ``path:N: field: reason`` (N the line, or the data row of a table); a
summary follows. ``convert`` writes only records that convert and validate cleanly, to a
temporary file renamed at the end, so OUT is never half-written; the others are reported the
same way.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ftkit.core import records
from ftkit.core.files import atomic, write_jsonl
from ftkit.core.formats import Detection, FormatError, Problem, to_openai, to_sharegpt
from ftkit.core.readers import iter_records
from ftkit.core.validation import validate
from ftkit.data.cleaning import map_contents, normalise_text

TARGETS = ("openai", "sharegpt", "parquet", "datasets")


@dataclass
class CheckSummary:
    records: int = 0
    valid: int = 0
    problems: Counter = field(default_factory=Counter)
    detection: Detection | None = None
    empty: list = field(default_factory=list)
    """Input files that hold no record at all (each one is a problem: an export cut short, a wrong file)."""

    @property
    def invalid(self) -> int:
        return self.records - self.valid

    @property
    def failed(self) -> bool:
        return bool(self.invalid or self.empty)

    def line(self) -> str:
        codes = ", ".join(f"{k} {v}" for k, v in self.problems.most_common())
        fmt = f" (format {self.detection.format}: {self.detection.reason})" if self.detection else ""
        empty = f", {len(self.empty):,} file(s) with no record" if self.empty else ""
        return (f"{self.records:,} records: {self.valid:,} valid, {self.invalid:,} with problems"
                + (f" [{codes}]" if codes else "") + empty + fmt)


def parse_columns(spec: str | None) -> dict[str, str] | None:
    """``user=instruction,assistant=response`` → ``{"user": "instruction", "assistant": "response"}``."""
    if not spec:
        return None
    out = {}
    for part in spec.split(","):
        role, _, col = part.partition("=")
        if role.strip() not in ("system", "user", "assistant") or not col.strip():
            raise ValueError(f"--columns: {part!r} is not ROLE=COLUMN with ROLE one of system, user, assistant")
        out[role.strip()] = col.strip()
    return out


def check(paths, fmt: str = "auto", columns: dict | None = None, alternate: bool = True,
          summary: CheckSummary | None = None,
          encoding: str = "utf-8") -> Iterator[tuple[str, dict | None, list[Problem]]]:
    """(where, canonical record or None, problems) for every record of ``paths``, read in ``encoding``."""
    summary = summary if summary is not None else CheckSummary()
    try:
        summary.detection = records.detect(paths, fmt, columns, encoding, set_by="--format")
    except FormatError as e:
        summary.detection = None
        for loc in iter_records(paths, encoding=encoding, empty=summary.empty):
            summary.records += 1
            problems = [Problem("", loc.error, "unreadable")] if loc.error else e.problems
            summary.problems[problems[0].code] += 1
            yield loc.where, None, problems
        yield from _empty_files(summary)
        return
    for item in records.canonical(paths, summary.detection, encoding, empty=summary.empty):
        summary.records += 1
        problems = item.problems or validate(item.record, alternate=alternate)
        if problems:
            summary.problems.update(p.code for p in problems)
        else:
            summary.valid += 1
        yield item.where, item.record, problems
    yield from _empty_files(summary)


def _empty_files(summary: CheckSummary) -> Iterator[tuple[str, None, list[Problem]]]:
    """One line per input file without any record (not counted as records: there are none)."""
    for p in summary.empty:
        yield str(p), None, [Problem("", "no record: the file is empty, holds only blank lines or a table header "
                                     "only; check the export", "empty")]


def write_records(records: list[dict], target: str, out: Path) -> Path:
    """Write canonical records as OpenAI JSONL, ShareGPT JSONL, Parquet or a datasets directory, atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if target in ("openai", "sharegpt"):
        conv = to_openai if target == "openai" else to_sharegpt
        write_jsonl(out, (conv(r) for r in records))
    elif target == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        with atomic(out) as tmp:
            pq.write_table(pa.Table.from_pylist([_columnar(r) for r in records]), str(tmp))
    elif target == "datasets":
        from datasets import Dataset

        with atomic(out, directory=True) as tmp:
            Dataset.from_list([_columnar(r) for r in records]).save_to_disk(str(tmp))
    else:
        raise ValueError(f"--to: unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    return out


def _columnar(record: dict) -> dict:
    """A row for Parquet/datasets: messages as a list of {role, content} (or text), meta as JSON text."""
    meta = json.dumps(record.get("meta", {}), ensure_ascii=False, default=str)
    if "messages" in record:
        return {"messages": [{"role": m["role"], "content": m.get("content") or ""} for m in record["messages"]],
                "meta": meta}
    return {"text": record["text"], "meta": meta}


def clean_for_export(record: dict) -> dict:
    return map_contents(record, normalise_text)
