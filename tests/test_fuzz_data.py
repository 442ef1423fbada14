"""Fuzzing the data path with Hypothesis: bytes of every kind written as .jsonl/.json/.csv/.tsv/.txt (gzipped
or not), JSON records of random shapes, tables with random columns, through the reader, format detection,
conversion, validation, ``ftkit validate``'s check and stage 01. Each may raise only ftkit's documented
errors (InputError: the file as a whole; FormatError: no format to read it in; ConfigError), and every record
read comes out once: kept, or quarantined / reported with its ``path:N`` and a reason."""

import csv
import gzip
import io
import json
import os
import re
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability import tally

from ftkit.core import records
from ftkit.core.config import ConfigError, DataConfig
from ftkit.core.files import read_jsonl
from ftkit.core.formats import FORMATS, Problem
from ftkit.core.paths import RunPaths
from ftkit.core.readers import InputError, iter_records
from ftkit.core.validation import validate
from ftkit.data.checker import CheckSummary, check
from ftkit.data.dataset import prepare

pytestmark = pytest.mark.reliability
DOCUMENTED = (InputError, ConfigError, records.FormatError)
SCALE = int(os.environ.get("FTKIT_FUZZ_SCALE", "1"))  # more examples for a longer hunt: FTKIT_FUZZ_SCALE=20
BASE = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# pieces real exports are made of, and the ways they break: joined at random they make near-miss files
FRAGMENTS = [b'{"messages": [', b'{"role": "user", "content": "hi"}', b'{"role": "assistant", "content": "yo"}',
             b'{"role": "tool", "content": null}', b'"weight": 2', b'"tool_calls": [{"function": {"arguments": "{x"}}]',
             b'{"conversations": [{"from": "human", "value": "q"}]}', b'{"instruction": "i", "output": "o"}',
             b'{"prompt": "p", "completion": "c"}', b'{"text": "t"}', b'{"data": [', b'"content": "a", "content": "b"',
             b"\n", b"\r\n", b"\r", b"\n\n", b'"', b",", b":", b"}", b"]", b"[", b"{", b"\t", b" ", b"\xff", b"\xe9",
             b"\x00", b"\xef\xbb\xbf", b"\xff\xfe", b"\\ud800", b"\\u0000", b"1e999", b"NaN", b"9" * 4400, b"[" * 1200,
             b"question,answer\n", b'"a ""quoted"" cell"', b'"open', b"user,assistant,user\n", b"\xe2\x80\xa8"]
SUFFIXES = [".jsonl", ".json", ".csv", ".tsv", ".txt", ".jsonl.gz", ".csv.gz"]
raw_bytes = st.one_of(st.binary(max_size=300), st.lists(st.sampled_from(FRAGMENTS), max_size=25).map(b"".join))

json_scalar = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_value = st.recursive(json_scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                          max_leaves=8)
role = st.sampled_from(["system", "user", "assistant", "tool", "human", "gpt", "", "USER"]) | json_value
content = st.text(max_size=20) | json_value
message = st.one_of(st.fixed_dictionaries({"role": role, "content": content},
                                          optional={"weight": json_value | st.sampled_from([0, 1]),
                                                    "tool_calls": json_value, "name": json_value}),
                    json_value)
record = st.one_of(
    st.fixed_dictionaries({"messages": st.lists(message, max_size=5) | json_value}, optional={"meta": json_value}),
    st.fixed_dictionaries({"conversations": st.lists(st.fixed_dictionaries({"from": role, "value": content}) | json_value,
                                                     max_size=4) | json_value}),
    st.dictionaries(st.sampled_from(["instruction", "input", "output", "prompt", "completion", "text", "system",
                                     "history", "question", "answer", "messages"]), json_value | st.text(max_size=10),
                    max_size=5),
    json_value)
COLUMNS = ["question", "answer", "instruction", "response", "user", "assistant", "text", "prompt", "id", "", "a b"]
cell = st.text(alphabet=string.ascii_letters + ' ,"\n\r\t;é€', max_size=12)


def _write(path: Path, data: bytes, how: str) -> None:
    if path.name.endswith(".gz"):
        data = {"gzip": gzip.compress(data), "cut": gzip.compress(data)[: max(2, len(data) // 3)], "plain": data}[how]
    path.write_bytes(data)


class Ledger:
    """What the fuzzing tried and what broke, for tests/reliability.py."""

    def __init__(self):
        self.inputs = self.lost = self.crashes = 0

    def run(self, fn, *args):
        self.inputs += 1
        try:
            return fn(*args)
        except DOCUMENTED:
            return None
        except Exception:
            self.crashes += 1
            raise

    def check(self, fuzz) -> None:
        """Run the Hypothesis test ``fuzz``, add what it tried to the ledger, and require no crash or loss."""
        try:
            fuzz()
        finally:
            tally("fuzzing", inputs=self.inputs, records_lost=self.lost, crashes=self.crashes)
        assert self.crashes == 0 and self.lost == 0


def _read_all(path: Path, fmt: str, columns: dict | None, ledger: Ledger) -> None:
    """The reader, detection, conversion, validation and check on one file; counts must reconcile."""
    located = list(iter_records(path))  # InputError: the whole file, documented
    where = re.compile(rf"{re.escape(str(path))}(:\d+)?")
    for loc in located:
        assert where.fullmatch(loc.where), loc.where
        assert (loc.record is None) != (loc.error is None) and (loc.record is None or isinstance(loc.record, dict))
        assert loc.error is None or (isinstance(loc.error, str) and loc.error.strip())
    detection = records.detect(path, fmt, columns)  # FormatError: no format, documented
    items = list(records.canonical(path, detection))
    ledger.lost += abs(len(located) - len(items))
    assert [i.where for i in items] == [loc.where for loc in located]
    for item in items:
        if item.record is None:
            assert item.problems and all(isinstance(p, Problem) and str(p) for p in item.problems)
        else:
            assert all(isinstance(p, Problem) and str(p) for p in validate(item.record))
            json.dumps(item.record, ensure_ascii=False, default=str).encode("utf-8")  # writable as a split file
    summary = CheckSummary()
    reported = list(check(path, fmt, columns, summary=summary))  # one entry per record, and one per empty file
    ledger.lost += abs(summary.records - len(located))
    assert summary.records == len(located) and len(reported) == len(located) + len(summary.empty)
    assert summary.valid == sum(1 for _, rec, problems in reported if rec is not None and not problems)
    assert bool(summary.empty) == (not located)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def test_any_bytes_in_any_data_file(work):
    ledger = Ledger()

    @settings(BASE, max_examples=250 * SCALE)
    @given(raw_bytes, st.sampled_from(SUFFIXES), st.sampled_from(["gzip", "gzip", "cut", "plain"]),
           st.sampled_from(["auto", "auto", *FORMATS]))
    def fuzz(data, suffix, how, fmt):
        path = work / f"input{suffix}"
        _write(path, data, how)
        columns = {"user": "question", "assistant": "answer"} if fmt == "columns" else None
        ledger.run(_read_all, path, fmt, columns, ledger)

    ledger.check(fuzz)


def test_json_records_of_any_shape(work):
    ledger = Ledger()

    @settings(BASE, max_examples=200 * SCALE)
    @given(st.lists(record, min_size=1, max_size=6), st.sampled_from([".jsonl", ".json"]),
           st.sampled_from(["auto", "auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"]))
    def fuzz(recs, suffix, fmt):
        path = work / f"shapes{suffix}"
        if suffix == ".json":
            path.write_text(json.dumps(recs, indent=1, allow_nan=True), encoding="utf-8")
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
        ledger.run(_read_all, path, fmt, None, ledger)
        assert len(list(iter_records(path))) == len(recs)  # one per record, none merged or lost

    ledger.check(fuzz)


def test_tables_with_random_columns(work):
    ledger = Ledger()

    @settings(BASE, max_examples=150 * SCALE)
    @given(st.lists(st.sampled_from(COLUMNS), min_size=1, max_size=4), st.lists(st.lists(cell, max_size=5), max_size=5),
           st.booleans(), st.sampled_from([",", "\t"]))
    def fuzz(header, rows, mapped, delimiter):
        path = work / ("table.csv" if delimiter == "," else "table.tsv")
        buf = io.StringIO()
        w = csv.writer(buf, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
        path.write_text(buf.getvalue(), encoding="utf-8")
        columns = {"user": header[0], "assistant": header[-1]} if mapped and header[0] and header[-1] else None
        ledger.run(_read_all, path, "columns" if columns else "auto", columns, ledger)
        located = list(iter_records(path))
        named = [c for c in header if c]
        if len(set(named)) < len(named):  # a column name twice: the file is one error, not rows missing a cell
            assert [loc.where for loc in located] == [str(path)] and "appears" in located[0].error
        else:  # csv.writer quotes what needs it: every row written (a blank row is no record) comes back once
            assert len(located) == sum(1 for r in rows if r != [])

    ledger.check(fuzz)


def test_stage_01_accounts_for_every_fuzzed_record(work):
    """prepare() on a subset (it writes splits and a quarantine file): rows in = kept + quarantined."""
    ledger = Ledger()
    n = [0]

    def stage(path: Path, fmt: str) -> None:
        n[0] += 1
        paths = RunPaths(work / "runs", f"r{n[0]}")
        read = len(list(iter_records(path)))
        res = prepare(DataConfig(path=str(path), format=fmt, val_fraction=0.0, test_fraction=0.0), paths, seed=0)
        quarantined = read_jsonl(paths.quarantine)
        ledger.lost += abs(read - res.rows_kept - len(quarantined))
        assert res.rows_in == read == res.rows_kept + len(quarantined)
        for q in quarantined:  # path:N, or the bare path for a file that is one unreadable whole (a bad header)
            whole = q["source"] == str(path) and read == 1 and q["record"] is None
            assert (re.fullmatch(rf"{re.escape(str(path))}:\d+", q["source"]) or whole) and q["reason"] and q["reason_code"], q

    @settings(BASE, max_examples=60 * SCALE)
    @given(st.one_of(raw_bytes, st.lists(record, min_size=1, max_size=5).map(
        lambda rs: "".join(json.dumps(r) + "\n" for r in rs).encode())),
        st.sampled_from([".jsonl", ".json", ".csv", ".txt"]), st.sampled_from(["auto", "auto", "messages", "text"]))
    def fuzz(data, suffix, fmt):
        path = work / f"stage{suffix}"
        path.write_bytes(data)
        ledger.run(stage, path, fmt)

    ledger.check(fuzz)
