"""Read training data from whatever a company exports, one record at a time, with its location.

One module because every reader shares the strict decoding, the location convention and the
streaming contract below; splitting them by format would repeat those.

Supported: JSONL/NDJSON, JSON (a list, or ``{"data": [...]}``), CSV/TSV, Excel ``.xlsx`` (the
first sheet, header in row 1), Parquet, a ``datasets`` directory saved with ``save_to_disk``,
plain text (``.txt``/``.md``: one record per blank-line separated block, for completion tuning),
any of these files gzipped (``x.jsonl.gz`` reads as JSONL), several files or a folder of them.
Line-based and columnar files are streamed (Parquet in record batches, a ``datasets`` directory
memory-mapped, a workbook row by row), so a million-record file is never held as Python objects
all at once.

Text is decoded strictly, line by line, in ``encoding`` (``data.encoding``, default UTF-8 with or
without a byte-order mark). A line that does not decode is never patched with U+FFFD: its record
comes back as unreadable, naming the byte offset (counted from 0 at the start of the file, of the
decompressed data for ``.gz``), and the other lines still read.

Each record comes as a :class:`Located` whose ``where`` is ``path:N``, the compiler convention:

- JSONL and text: N is the line (for a text block, its first line);
- JSON: N is the line where the record starts;
- CSV/TSV, xlsx, Parquet, datasets: N is the data row, 1 = the first row after the header (in a
  workbook, data row N is spreadsheet row N+1); a CSV error also names the physical line.

A record that cannot be read at all (bytes that do not decode, invalid JSON, not an object) comes
with ``error`` set instead of raising, so the caller can quarantine it and carry on; a whole
file that cannot be opened as its type (not gzip, not a workbook, a truncated Parquet file,
UTF-16 text) raises :class:`InputError`. Nothing else escapes: JSON nested too deeply, an integer
of over 4,300 digits, a key given twice in one object (JSON would keep only the last value), a
lone surrogate escape, a CSV quote never closed or a column name given twice are the record's
(or the file's) error, with the fix.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import datetime as dt
import gzip
import json
import re
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
            ".xlsx": "xlsx", ".parquet": "parquet", ".txt": "text", ".md": "text"}
_UTF8 = ("utf-8", "utf-8-sig")
_ASCII = "".join(map(chr, range(32, 127))) + "\t\n\r"


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
            # "~$book.xlsx" is the lock file Excel leaves next to an open workbook, not data
            found = sorted(f for f in p.rglob("*") if f.is_file() and _data_suffix(f) in SUFFIXES
                           and not f.name.startswith("~$"))
            found += sorted(d for d in p.rglob("*") if d.is_dir() and is_datasets_dir(d))
            if not found:
                raise InputError(f"{p}: the folder holds no data file ({_supported()})")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise InputError(f"{p}: no such file or folder; check data.path")
    return out


def is_datasets_dir(p: Path) -> bool:
    return p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists())


def _gzipped(p: Path) -> bool:
    return p.suffix.lower() == ".gz"


def _data_suffix(p: Path) -> str:
    """The suffix that says how to read ``p``: the one before ``.gz`` for a gzipped file."""
    return (p.with_suffix("") if _gzipped(p) else p).suffix.lower()


def _supported() -> str:
    return f"{', '.join(sorted(SUFFIXES))}, each optionally gzipped (.gz)"


def file_kind(p: Path) -> str:
    if is_datasets_dir(p):
        return "datasets"
    kind = SUFFIXES.get(_data_suffix(p))
    if kind is None:
        shown = "".join(p.suffixes[-2:]) if _gzipped(p) else p.suffix
        raise InputError(f"{p}: unsupported file type '{shown}'; use one of {_supported()}, or a datasets directory")
    return kind


def encoding_problem(name: Any) -> str | None:
    """Why ``name`` cannot be the data's encoding, or None when it can."""
    try:
        info = codecs.lookup(name)
    except (LookupError, TypeError):
        info = None
    if info is None or not getattr(info, "_is_text_encoding", True):  # base64, rot13…: not a text encoding
        return f"{name!r}: unknown text encoding; use a Python codec name such as utf-8, cp1252 or latin-1"
    # lines are split at the bytes \n and \r, and CSV cells at ASCII quotes and delimiters, so ASCII
    # must be written as ASCII bytes: true of UTF-8, cp1252, latin-1, shift_jis…, not of UTF-16/32 or EBCDIC
    if info.name not in _UTF8 and _ascii_bytes(info.name) != _ASCII.encode():
        return (f"{name!r} is not supported: files are read line by line, which needs an encoding that writes "
                f"ASCII as ASCII (utf-8, cp1252, latin-1, shift_jis…); convert first: iconv -f {name} -t utf-8")
    return None


def _ascii_bytes(codec: str) -> bytes | None:
    try:
        return codecs.encode(_ASCII, codec)
    except (UnicodeError, TypeError, ValueError):
        return None


def iter_records(paths, encoding: str = "utf-8", empty: list | None = None) -> Iterator[Located]:
    """Every record of every input, in order, streamed; text decoded in ``encoding``. Files that hold
    no record at all (empty, blank lines only, a header only) are appended to ``empty`` when given."""
    problem = encoding_problem(encoding)
    if problem:
        raise InputError(f"encoding {problem}")
    inputs = [(p, file_kind(p)) for p in expand(paths)]
    for p, _ in inputs:  # before reading anything, so a misnamed file stops the run at once
        if _gzipped(p) and not p.is_dir():
            with open(p, "rb") as f:
                if f.read(2) != b"\x1f\x8b":
                    raise InputError(f"{p}: not a gzip file; remove '.gz' from its name if it is a plain "
                                     f"{file_kind(p)} file, or compress it with gzip")
    for p, kind in inputs:
        n = 0
        try:
            if kind in _TEXT_KINDS and codecs.lookup(encoding).name in _UTF8:
                _refuse_wide_text(p)
            for n, loc in enumerate(_READERS[kind](p, encoding), 1):  # noqa: B007 - n counts the file's records
                yield loc
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            if not _gzipped(p):
                raise
            raise InputError(f"{p}: the gzip data is damaged ({e}); compress or export the file again") from None
        except (PermissionError, IsADirectoryError) as e:
            raise InputError(f"{p}: cannot be read ({e.strerror}); check the file's permissions") from None
        if n == 0 and empty is not None:
            empty.append(p)


_TEXT_KINDS = ("jsonl", "json", "csv", "tsv", "text")
_WIDE_BOMS = [(codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),
              (codecs.BOM_UTF16_BE, "utf-16")]


def _refuse_wide_text(p: Path) -> None:
    """A UTF-16/32 file (Excel's "Unicode text", PowerShell's default) would read as one bad line after
    another: one error for the file instead, with the command that converts it."""
    with _open(p) as f:
        head = f.read(512)
    codec = next((name for bom, name in _WIDE_BOMS if head.startswith(bom)), None)
    if codec is None and len(head) >= 8 and head.count(0) * 4 >= len(head) and (
            head[1::2].count(0) * 2 >= len(head) // 2 or head[0::2].count(0) * 2 >= len(head) // 2):
        codec = "utf-16"  # no byte-order mark, but every other byte is 0: ASCII text written as UTF-16
    if codec:
        raise InputError(f"{p}: the file is {codec.upper()} text, not UTF-8 (its bytes are 2 or 4 per character); "
                         f"convert it first: iconv -f {codec} -t utf-8 {p.name} > {p.stem}-utf8{p.suffix}")


def _open(p: Path):
    """``p`` as bytes, decompressed on the fly when it is a ``.gz``."""
    return gzip.open(p, "rb") if _gzipped(p) else open(p, "rb")  # noqa: SIM115 - the caller closes it


def _bad_bytes(encoding: str, at: int, whole_file: bool = False) -> str:
    """The error for bytes at offset ``at`` that do not decode, with the fix."""
    codec = codecs.lookup(encoding).name
    where = f"{at} (the whole file is unreadable until this is fixed)" if whole_file else at
    if codec in _UTF8:
        return f"invalid UTF-8 at byte {where}; set data.encoding (e.g. cp1252 or latin-1), or --encoding on the command line"
    return f"invalid {codec} at byte {where}; set data.encoding to the file's encoding (latin-1 reads any byte)"


def _lines(f, encoding: str) -> Iterator[tuple[int, str, int | None]]:
    """(line number, text with its line end, offset of the first bad byte) per physical line of binary ``f``.

    A line that does not decode comes with the offset and a stand-in text (U+FFFD for the bad
    bytes) that only keeps a CSV's quotes and delimiters in place: no caller keeps it as data."""
    codec = codecs.lookup(encoding).name
    utf8 = codec in _UTF8
    offset = n = 0
    for raw in f:
        # bytes.splitlines breaks at \n, \r\n and a lone \r only: text mode's universal newlines
        for piece in raw.splitlines(keepends=True):
            n += 1
            start, offset = offset, offset + len(piece)
            if n == 1 and utf8 and piece.startswith(codecs.BOM_UTF8):
                piece, start = piece[len(codecs.BOM_UTF8):], start + len(codecs.BOM_UTF8)
            try:
                text, bad_at = piece.decode("utf-8" if utf8 else codec), None
            except UnicodeDecodeError as e:
                text, bad_at = piece.decode("utf-8" if utf8 else codec, errors="replace"), start + e.start
            yield n, text, bad_at


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list) -> dict:
    """``object_pairs_hook``: a key given twice in one object would keep only its last value, silently."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _DuplicateKey(key)
    return obj


_STRICT = json.JSONDecoder(object_pairs_hook=_no_duplicates)


def _loads(text: str, decoder: json.JSONDecoder = _STRICT, at: int = 0) -> tuple[Any, int, str | None]:
    """(value, end, None) for the JSON value at ``at``, or (None, at, why not) with the fix: what
    ``json`` raises besides JSONDecodeError (nesting too deep, an integer of over 4,300 digits), a key given
    twice, a lone surrogate escape (no UTF-8 file can hold it) are errors of the record, not crashes."""
    try:
        obj, end = decoder.raw_decode(text, at)
    except json.JSONDecodeError as e:
        return None, at, _json_error(e)
    except _DuplicateKey as e:
        return None, at, (f"invalid JSON: the key {e.args[0]!r} appears twice in one object (only the last value "
                          "would be kept); remove or rename one")
    except RecursionError:
        return None, at, "invalid JSON: nested too deeply (over ~1,000 levels of [ or {) to be a record"
    except ValueError as e:  # int() of a number with more than sys.get_int_max_str_digits() digits
        return None, at, f"invalid JSON: {e}".split("; use sys.")[0] + "; write the number as a string"
    if "\\u" in text and _SURROGATE.search(text, at, end):
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            bad = e.object[e.start:e.end].encode("utf-16", "surrogatepass")[2:].hex()
            return None, at, (f"invalid JSON: the escape \\u{bad[2:4]}{bad[:2]} is half of a UTF-16 surrogate "
                              "pair, not a character; fix the exporter's escaping")
        except (RecursionError, ValueError):
            pass
    return obj, end, None


def _json_error(e: json.JSONDecodeError) -> str:
    if e.msg.startswith("Invalid control character"):  # a raw NUL, tab or line break inside a string
        return (f"invalid JSON (the control character {e.doc[e.pos]!r} inside a string at column {e.colno}); "
                "write it escaped (\\n, \\t, \\u0000) or remove it")
    cut = e.msg.startswith("Unterminated string") or e.pos >= len(e.doc.rstrip())
    return f"invalid JSON ({e.msg.removesuffix(' at')} at column {e.colno})" + (
        ": it ends before the record does (cut short?)" if cut else "")


_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def _jsonl(p: Path, encoding: str) -> Iterator[Located]:
    with _open(p) as f:
        first = True
        for i, line, bad_at in _lines(f, encoding):
            where = f"{p}:{i}"
            if bad_at is not None:
                yield Located(where, None, _bad_bytes(encoding, bad_at))
                first = False
                continue
            line = line.rstrip("\r\n")  # the line end is no part of the record (an unclosed string ends here)
            if not line.strip(" \t\r\n"):
                continue
            if first and line.strip() in ("[", "{"):  # a pretty-printed JSON document, not one record per line
                first = False
                document = _one_document(f, line)
                if document:
                    yield Located(where, None, document)
                    return
            first = False
            obj, end, error = _loads(line, at=_WS.match(line).end())
            if error is None and (extra := _WS.match(line, end).end()) != len(line):
                error = f"invalid JSON (Extra data at column {extra + 1})"
            if error:
                yield Located(where, None, error if ";" in error else f"{error}; fix or remove the line")
                continue
            yield _object(where, obj)


def _one_document(f, first_line: str) -> str | None:
    """When the file from ``first_line`` on is one JSON value, why it is not JSON Lines; else None
    (``f`` rewound to just after the first line, so reading goes on line by line)."""
    pos = f.tell()
    try:
        json.loads(first_line.encode() + f.read())
    except (ValueError, RecursionError):  # not one document (or not UTF-8): read it line by line
        f.seek(pos)
        return None
    if first_line.strip() == "[":
        return ("the whole file is one pretty-printed JSON list, not JSON Lines (one record per line); rename it to "
                ".json to read it as a list of records, or write one record per line: jq -c '.[]'")
    return ("the whole file is one pretty-printed JSON object, not JSON Lines (one record per line); write each "
            "record on one line: jq -c .")


def _object(where: str, obj: Any) -> Located:
    if isinstance(obj, dict):
        return Located(where, obj)
    return Located(where, None, f"expected a JSON object per record, got {'null' if obj is None else type(obj).__name__}")


def _json(p: Path, encoding: str) -> Iterator[Located]:
    with _open(p) as f:
        raw = f.read()
    codec = codecs.lookup(encoding).name
    skip = len(codecs.BOM_UTF8) if codec in _UTF8 and raw.startswith(codecs.BOM_UTF8) else 0
    try:
        text = raw[skip:].decode("utf-8" if codec in _UTF8 else codec)
    except UnicodeDecodeError as e:
        at = skip + e.start
        line = raw.count(b"\n", 0, at) + 1
        yield Located(f"{p}:{line}", None, _bad_bytes(encoding, at, whole_file=True))
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        lines = " (one JSON value per line is JSON Lines: rename the file to .jsonl)" if (
            e.msg == "Extra data" and text[e.pos - 1:e.pos] == "\n" and text.lstrip()[:1] == "{") else ""
        yield Located(f"{p}:{e.lineno}", None, f"{_json_error(e)}{lines}; the whole file is unreadable until this "
                      "is fixed")
        return
    except (RecursionError, ValueError):  # too deep, or a huge integer: _loads says which
        _, _, error = _loads(text, at=_WS.match(text).end())
        yield Located(f"{p}:1", None, f"{error or 'invalid JSON'}; the whole file is unreadable until this is fixed")
        return
    wrapped = isinstance(data, dict) and isinstance(data.get("data"), list)
    if not (wrapped or isinstance(data, list)):
        yield Located(str(p), None, 'expected a JSON list of records or {"data": [...]}')
        return
    for line, obj, error in _json_items(text, wrapped):
        yield Located(f"{p}:{line}", None, error) if error else _object(f"{p}:{line}", obj)


_WS = re.compile(r"[ \t\n\r]*")


def _json_items(text: str, wrapped: bool) -> Iterator[tuple[int, Any, str | None]]:
    """(line, item, error) for each record of a JSON text that ``json.loads`` accepted: the top-level
    list, or the list under the top-level "data" key (the last one, as json.loads keeps)."""
    dec = json.JSONDecoder()

    def skip(i: int) -> int:  # past whitespace
        return _WS.match(text, i).end()

    i = skip(0)
    if wrapped:
        i, start = i + 1, 0  # past the "{"
        while text[i := skip(i)] != "}":
            key, i = dec.raw_decode(text, i)
            i = skip(skip(i) + 1)  # past the ":"
            if key == "data":
                start = i
            _, i = dec.raw_decode(text, i)
            i = skip(i)
            i += text[i] == ","
        i = start
    i, line, counted = i + 1, 1, 0  # past the "["
    while text[i := skip(i)] != "]":
        line, counted = line + text.count("\n", counted, i), i
        obj, end, error = _loads(text, at=i)  # a duplicate key spoils its record only
        if error:
            obj, end = dec.raw_decode(text, i)
            obj = None
        yield line, obj, error
        i = end
        i = skip(i)
        i += text[i] == ","


def _csv(p: Path, encoding: str, delimiter: str = ",") -> Iterator[Located]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    bad: dict[int, int] = {}  # physical line -> offset of its first byte that does not decode

    def text(f):
        for n, line, bad_at in _lines(f, encoding):
            if bad_at is not None:
                bad[n] = bad_at
            yield line

    with _open(p) as f:
        # strict: a quote left open is an error at the end of the file, not one cell swallowing every row after it
        reader = csv.DictReader(text(f), delimiter=delimiter, strict=True)
        try:
            header = reader.fieldnames
        except csv.Error as e:
            yield Located(str(p), None, f"line {reader.reader.line_num} (the header): {_csv_error(e)}; the whole "
                          "file is unreadable until this is fixed")
            return
        if header is not None and bad:  # the column names themselves are wrong
            n = min(bad)
            yield Located(str(p), None, f"line {n} (the header): {_bad_bytes(encoding, bad[n], whole_file=True)}")
            return
        twice = sorted({c for c in header or () if c and header.count(c) > 1})
        if twice:
            yield Located(str(p), None, f"line 1 (the header): the column {twice[0]!r} appears {header.count(twice[0])} "
                          "times, so each row would keep only its last cell; rename the columns apart")
            return
        last = reader.line_num
        for i, row in enumerate(_csv_rows(reader), 1):
            if isinstance(row, csv.Error):
                now = reader.reader.line_num
                yield Located(f"{p}:{i}", None, f"line {last + 1}: {_csv_error(row, now - last)}")
                last = now
                continue
            # the physical lines of this row (a quoted cell may span several): any bad one spoils the row,
            # so the row is one quarantined record and records in = kept + quarantined still holds
            hit = [n for n in range(last + 1, reader.line_num + 1) if n in bad] if bad else []
            last = reader.line_num
            if hit:
                more = f" (and {len(hit) - 1} more line(s) of this row)" if len(hit) > 1 else ""
                yield Located(f"{p}:{i}", None, f"line {hit[0]}: {_bad_bytes(encoding, bad[hit[0]])}{more}")
                for n in hit:
                    del bad[n]
            elif None in row:  # more cells than header columns
                yield Located(f"{p}:{i}", None, f"{len(row[None])} more cell(s) than the header has columns "
                              "(an unquoted delimiter?)")
            else:
                yield Located(f"{p}:{i}", dict(row))


def _csv_rows(reader: csv.DictReader) -> Iterator[dict | csv.Error]:
    """The rows, a malformed one as its csv.Error (the reader goes on at the next line)."""
    while True:
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield e


def _csv_error(e: csv.Error, lines: int = 1) -> str:
    msg = str(e)
    if "unexpected end of data" in msg:
        return (f"a quoted cell is never closed: the quote runs to the end of the file ({lines} line(s)), so the rows "
                'after it would be one cell; close the quote, or write a quote inside a cell as ""')
    if "expected after" in msg:
        return (f"a quoted cell goes on after its closing quote ({msg}); quote the whole cell and write a quote "
                'inside it as ""')
    return f"malformed CSV ({msg})"


def _tsv(p: Path, encoding: str) -> Iterator[Located]:
    return _csv(p, encoding, "\t")


def _xlsx(p: Path, encoding: str) -> Iterator[Located]:
    """The first sheet, header in row 1; ``encoding`` is unused (a workbook stores Unicode)."""
    from openpyxl import load_workbook

    with _open(p) as f:
        try:  # read-only streams the rows; data_only gives a formula's value as Excel last showed it
            wb = load_workbook(f, read_only=True, data_only=True)
        except Exception as e:  # a zip that is not a workbook fails in many ways; all mean the same
            raise InputError(f"{p}: not a readable .xlsx workbook ({type(e).__name__}: {e}); save it again "
                             "from the spreadsheet as .xlsx, or export the sheet as CSV") from None
        try:
            rows = wb.worksheets[0].iter_rows(values_only=True)
            header = [_cell(v) for v in next(rows, ())]
            while header and header[-1] == "":
                header.pop()
            twice = sorted({c for c in header if c and header.count(c) > 1})
            if twice:  # as in a CSV: each row would keep only the last of the cells under that name
                yield Located(str(p), None, f"row 1 (the header): the column {twice[0]!r} appears "
                              f"{header.count(twice[0])} times, so each row would keep only its last cell; rename "
                              "the columns apart")
                return
            for i, cells in enumerate(rows, 1):
                values = [_cell(v) for v in cells]
                if not any(values):  # an empty row is no record (as a blank CSV line); later rows keep their number
                    continue
                extra = [v for v in values[len(header):] if v != ""]
                if extra:
                    yield Located(f"{p}:{i}", None, f"{len(extra)} cell(s) right of the header's {len(header)} "
                                  "columns; give them a header in row 1 or delete them")
                    continue
                values += [""] * (len(header) - len(values))
                yield Located(f"{p}:{i}", dict(zip(header, values, strict=False)))
        finally:
            wb.close()


def _cell(v: Any) -> str:
    """A cell as the text a CSV export of the sheet holds, so a table reads the same from either."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "TRUE" if v else "FALSE"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, dt.datetime):
        return v.date().isoformat() if v.time() == dt.time() else v.isoformat(sep=" ")
    if isinstance(v, (dt.date, dt.time)):
        return v.isoformat()
    return str(v)


def _parquet(p: Path, encoding: str) -> Iterator[Located]:
    import pyarrow.parquet as pq

    i = 0
    with contextlib.ExitStack() as stack:
        # a path lets Arrow read natively; a .gz goes through the (seekable) decompressing file
        source = stack.enter_context(gzip.open(p, "rb")) if _gzipped(p) else p
        try:
            batches = pq.ParquetFile(source).iter_batches(batch_size=4096)
            for batch in batches:
                for row in batch.to_pylist():
                    i += 1
                    yield Located(f"{p}:{i}", row)
        except (OSError, ValueError, TypeError) as e:  # pyarrow's ArrowInvalid/ArrowIOError are these
            if isinstance(e, (EOFError, zlib.error, gzip.BadGzipFile)):
                raise
            after = f" after row {i}" if i else ""
            raise InputError(f"{p}: not a readable Parquet file{after} ({type(e).__name__}: {e}); it may be truncated: "
                             "export or copy it again") from None


def _datasets(p: Path, encoding: str) -> Iterator[Located]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(p))  # memory-mapped Arrow
    except Exception as e:  # a damaged directory fails in many ways (JSON, Arrow, missing files); all mean the same
        raise InputError(f"{p}: not a readable datasets directory ({type(e).__name__}: {e}); save it again with "
                         "save_to_disk") from None
    parts = ds.items() if isinstance(ds, DatasetDict) else [(None, ds)]
    for split, d in parts:
        label = f"{p}[{split}]" if split else str(p)
        for i, row in enumerate(d, 1):
            yield Located(f"{label}:{i}", row)


def _text(p: Path, encoding: str) -> Iterator[Located]:
    block: list[str] = []
    start, error = 0, None  # the block's first line; the first bad line in it
    with _open(p) as f:
        for i, line, bad_at in _lines(f, encoding):
            if line.strip():
                if not block:
                    start, error = i, None
                block.append(line.rstrip("\r\n"))
                if bad_at is not None and not error:
                    error = _bad_bytes(encoding, bad_at)
                    error = error if i == start else f"line {i}: {error}"
            elif block:
                yield _block(p, start, block, error)
                block = []
    if block:
        yield _block(p, start, block, error)


def _block(p: Path, start: int, lines: list[str], error: str | None) -> Located:
    return Located(f"{p}:{start}", None, error) if error else Located(f"{p}:{start}", {"text": "\n".join(lines)})


_READERS = {"jsonl": _jsonl, "json": _json, "csv": _csv, "tsv": _tsv, "xlsx": _xlsx, "parquet": _parquet,
            "datasets": _datasets, "text": _text}
