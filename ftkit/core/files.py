"""Writing and reading ftkit's files: every output committed by one rename, JSON and JSONL, file hashes,
and a full disk reported as such (path, space free, space needed) instead of a library's words for it."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


class DiskFullError(OSError):
    """A write ran out of disk space: the message names the path, the space free and the space needed."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def sha256_file(path: Path) -> str:
    """The SHA-256 of one file, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()



PARTIAL = ".*.tmp"
"""How :func:`atomic` names what it has not finished writing."""


def remove_partial_writes(root: Path) -> list[Path]:
    """Temporary files and folders that :func:`atomic` left under ``root`` when its process was killed."""
    import shutil

    found = sorted(root.rglob(PARTIAL)) if root.exists() else []
    for p in found:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return found


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename), so readers never see half a file."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_jsonable) + "\n")


def read_json(path: Path, produced_by: str | None = None) -> Any:
    if not path.exists() and produced_by:
        raise FileNotFoundError(f"{path} does not exist: it is written by stage {produced_by}; run it first.")
    return json.loads(path.read_text(encoding="utf-8"))


@contextlib.contextmanager
def atomic(path: Path, directory: bool = False, needed_bytes: int | None = None):
    """Write ``path`` (a file, or a directory with ``directory``) under a temporary name beside it, renamed
    into place only when the block finishes: a crash or a full disk never leaves half a file where a
    later stage, a rerun or a server would take it for complete. An existing directory is replaced.

    A full disk (before writing, when ``needed_bytes`` is known, or during) raises :class:`DiskFullError`
    naming the path, the space free and the space needed; what was there before is left as it was."""
    import errno
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if needed_bytes is not None:
        free = shutil.disk_usage(path.parent).free
        if free < needed_bytes:
            raise DiskFullError(errno.ENOSPC, _disk_full(path, free, needed_bytes))
    if directory:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    else:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if directory and path.exists():
            old = path.with_name(f".{path.name}.old.tmp")  # never a moment with neither the old nor the new
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        written = _size(tmp)
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, DiskFullError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(path.parent).free
            raise DiskFullError(e.errno, _disk_full(path, free, needed_bytes, written)) from None
        raise


NEARLY_FULL = 1 << 20
"""Free bytes under which a failed write is put down to a full disk whatever the library's words for it
(torch.save says ``unexpected pos 143424 vs 143316`` when the disk fills mid-file)."""


def disk_full_error(path: Path, needed: int | None, e: BaseException) -> DiskFullError | None:
    """``e`` as a :class:`DiskFullError` about ``path`` when a full disk caused it, else None."""
    import errno
    import shutil

    path = Path(path)
    probe = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    cause = _disk_full_cause(e)
    if cause is None and free >= NEARLY_FULL:
        return None
    where = Path(getattr(cause, "filename", None) or path)
    return DiskFullError(errno.ENOSPC, f"{_disk_full(where, free, needed)} ({type(e).__name__}: {e})")


def _disk_full_cause(e: BaseException) -> BaseException | None:
    """The out-of-space error behind ``e``, or None. Libraries report a full disk their own way: an OSError
    with ENOSPC (Python's files), or a RuntimeError carrying the message (torch.save's stream writer)."""
    import errno

    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        if "No space left on device" in str(e) or "file write failed" in str(e):
            return e
        e = e.__cause__ or e.__context__
    return None


def _size(p: Path) -> int:
    try:
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    except OSError:
        return 0


def _gb(n: int) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def _disk_full(path: Path, free: int, needed: int | None, written: int | None = None) -> str:
    need = (f"about {_gb(needed)} needed" if needed is not None
            else f"more than the {_gb(written)} written before the disk filled is needed" if written
            else "more is needed")
    return (f"{path}: no space left on the disk: {_gb(free)} free, {need}. Nothing was replaced: earlier files are "
            f"as they were. Free space there, or set outputs_dir to a larger disk, and run the stage again")


def atomic_write_text(path: Path, text: str) -> None:
    with atomic(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_jsonl(path: Path, rows) -> int:
    """Write an iterable of dicts as JSONL atomically; returns the row count."""
    n = 0
    with atomic(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=_jsonable) + "\n")
            n += 1
    return n


def iter_jsonl(path: Path):
    """The records of a JSONL file, one at a time (blank lines skipped); a bad line names file:line and the fix."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg}); fix or remove that line") from None


def read_jsonl(path: Path) -> list[dict]:
    return list(iter_jsonl(path))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
