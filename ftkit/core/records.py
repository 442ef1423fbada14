"""The one loop from files to canonical records: read (streamed, with locations) → detect the format once →
convert each record, every problem kept with its ``path:LINE`` / ``path:ROW``.

Stage 01 (:mod:`ftkit.data.dataset`), ``ftkit validate``/``convert`` (:mod:`ftkit.data.checker`) and the
general data of the forgetting guard (:mod:`ftkit.core.replay`) all read through here, so a record is read,
detected and converted the same way wherever it comes from.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from ftkit.core.formats import Detection, FormatError, Problem, detect_format, to_canonical
from ftkit.core.readers import iter_records


@dataclass
class Canonical:
    where: str  # path:LINE or path:ROW
    raw: dict | None  # the record as read (None when unreadable)
    record: dict | None  # the canonical chat record (None when it could not be converted)
    problems: list[Problem] = field(default_factory=list)  # why not, when record is None

    @property
    def code(self) -> str:
        return self.problems[0].code if self.problems else ""

    @property
    def reason(self) -> str:
        return "; ".join(map(str, self.problems))


def detect(paths, fmt: str = "auto", columns: dict | None = None, encoding: str = "utf-8",
           set_by: str = "data.format") -> Detection:
    """The format of ``paths``: as configured, or detected from the readable records. When detection
    fails and some record was unreadable, the error names the first one (often the encoding is wrong)."""
    if fmt != "auto":
        return Detection(fmt, f"set by {set_by}", columns or None)
    unreadable: list[str] = []
    empty: list = []

    def readable():
        for loc in iter_records(paths, encoding=encoding, empty=empty):
            if loc.record is not None:
                yield loc.record
            elif not unreadable:
                unreadable.append(f"{loc.where}: {loc.error}")

    try:
        return detect_format(readable(), columns or None)
    except FormatError as e:
        if e.problems[0].code == "empty" and not unreadable:  # say which file(s), and what an empty one is
            shown = ", ".join(map(str, empty)) or str(paths)
            raise FormatError([Problem("", f"{shown}: no record to read: the file is empty, holds only blank "
                                       "lines or a table header only; check the export", "empty")]) from None
        if not unreadable:
            raise
        raise FormatError([*e.problems, Problem("", f"the first unreadable record: {unreadable[0]}",
                                                "unreadable")]) from None


def canonical(paths, detection: Detection, encoding: str = "utf-8", empty: list | None = None) -> Iterator[Canonical]:
    """Every record of ``paths`` converted with ``detection``, in file order; an unreadable or
    unconvertible one comes with its problems instead of being skipped. Files without any record
    are appended to ``empty`` when given."""
    for loc in iter_records(paths, encoding=encoding, empty=empty):
        if loc.error:
            yield Canonical(loc.where, None, None, [Problem("", loc.error, "unreadable")])
            continue
        try:
            yield Canonical(loc.where, loc.record, to_canonical(loc.record, detection))
        except FormatError as e:
            yield Canonical(loc.where, loc.record, None, list(e.problems))
