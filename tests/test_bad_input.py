"""A corpus of what real exports contain (tests/data/bad/, expectations in its expected.json): ``ftkit validate``
as a real process gives one ``path:LINE:`` line per problem, the counts and a non-zero exit, never a traceback;
stage 01 on the same input accounts for every record (in = kept + quarantined) or stops with a documented
error that names the file."""

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from reliability import tally

from ftkit.core.config import ConfigError, DataConfig
from ftkit.core.files import read_jsonl
from ftkit.core.formats import FormatError
from ftkit.core.paths import RunPaths
from ftkit.core.readers import InputError
from ftkit.data.dataset import prepare

BAD = Path(__file__).parent / "data" / "bad"
SPEC = json.loads((BAD / "expected.json").read_text(encoding="utf-8"))["cases"]
ERRORS = {"InputError": InputError, "FormatError": FormatError, "ConfigError": ConfigError}
LOCATED = re.compile(r"^(?P<where>.+?:\d+|[^:]+): \S")  # path:N: reason, or path: reason for a whole file

pytestmark = pytest.mark.reliability


def _rec(user: str, reply: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


def _generate(kind: str, path: Path) -> None:
    """The cases that are binary or large, written here instead of committed."""
    if kind == "binary":  # the first bytes of a PNG, then every byte value twice
        path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 2)
    elif kind == "huge_record":  # 10 MB in one record, then a copy cut off at 5 MB (an interrupted export)
        big = "All the terms and conditions, word by word. " * (10_000_000 // 45)
        path.write_text(json.dumps(_rec("Summarise this contract: " + big, "It is long.")) + "\n"
                        + json.dumps(_rec("Cut: " + big, "x"))[:5_000_000] + "\n")
    elif kind == "truncated_gzip":
        path.write_bytes(gzip.compress((json.dumps(_rec("Hi", "Hello")) + "\n").encode() * 2000)[:300])
    elif kind == "deep_nesting":
        path.write_text(json.dumps(_rec("Hi", "Hello")) + "\n" + '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    elif kind == "deep_nesting_json":
        path.write_text("[" * 50_000 + "]" * 50_000)
    elif kind == "utf16":
        path.write_bytes((json.dumps(_rec("Hi", "Hello")) + "\r\n").encode("utf-16"))
    elif kind == "utf16_nobom":
        path.write_bytes("question,answer\r\nHi,Hello\r\n".encode("utf-16-le"))
    elif kind == "truncated_parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(100)], "completion": ["c"] * 100}), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "duplicate_header_xlsx":
        from openpyxl import Workbook

        wb = Workbook()
        wb.active.append(["question", "answer", "answer"])
        wb.active.append(["How do I reset?", "Click reset.", "Old answer"])
        wb.save(path)
    elif kind == "folder":
        path.mkdir()
        (path / "a.jsonl").write_text(json.dumps(_rec("Hi", "Hello")) + "\n")
        (path / "b.jsonl").write_text("")
        (path / "c.csv").write_text("question,answer\nHi,\n")
    else:
        raise AssertionError(f"expected.json names an unknown generator {kind!r}")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """Case name -> the input: the committed file, or the generated one."""
    gen = tmp_path_factory.mktemp("bad")
    out = {}
    for name, case in SPEC.items():
        file = case.get("file", name)
        if "generate" in case:
            _generate(case["generate"], gen / file)
            out[name] = gen / file
        else:
            out[name] = BAD / file
            assert out[name].exists(), f"tests/data/bad/{file} is missing"
    return out


def test_every_committed_file_has_expectations():
    files = {p.name for p in BAD.iterdir()} - {"expected.json"}
    named = {c.get("file", n) for n, c in SPEC.items() if "generate" not in c}
    assert files == named, f"files without a case: {sorted(files - named)}; cases without a file: {sorted(named - files)}"


def _prefix(path: Path, loc: str) -> str:
    """Where a line must start: ``path:N: ``, ``path: `` (the whole file), in a folder ``folder/name:N: ``."""
    if path.is_dir():
        return f"{path}/{loc}" + ("" if loc.endswith(":") else ":") + " "
    return f"{path}:{loc}: " if loc else f"{path}: "


def _validate(path: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "ftkit", "validate", *args, str(path)], capture_output=True,
                          text=True, timeout=120, env=env)


def test_validate_gives_one_precise_line_per_problem(corpus):
    crashes = 0
    failures = []
    for name, case in SPEC.items():
        path = corpus[name]
        proc = _validate(path, case.get("args", []))
        out, err = proc.stdout.splitlines(), proc.stderr.splitlines()
        crashed = "Traceback" in proc.stdout + proc.stderr
        crashes += crashed
        problems = []
        if crashed:
            problems.append("traceback:\n" + proc.stderr[-2000:])
        if proc.returncode != case["exit"]:
            problems.append(f"exit {proc.returncode}, expected {case['exit']}")
        if case["lines"] is not None:
            want = [_prefix(path, loc) for loc, _ in case["lines"]]
            if len(out) != len(case["lines"]):
                problems.append(f"{len(out)} output line(s), expected {len(case['lines'])}: {out}")
            for line, prefix, (_, text) in zip(out, want, case["lines"], strict=False):
                if not line.startswith(prefix + text):
                    problems.append(f"line {line!r}\n   expected to start with {prefix + text!r}")
        if not all(LOCATED.match(line) for line in out):
            problems.append(f"a line without its location: {out}")
        if "summary" in case and not (err and err[-1].startswith(case["summary"])):
            problems.append(f"summary {err[-1:]} expected to start with {case['summary']!r}")
        if "stderr" in case:
            expected = case["stderr"].replace("{path}", str(path))
            if not (err and err[0].startswith(expected)) or len(err) != 1:
                problems.append(f"stderr {err} expected one line starting with {expected!r}")
        if proc.returncode == 0:
            problems.append("exit 0 for a bad input")
        if problems:
            failures.append(f"{name} ({case['what']}):\n  " + "\n  ".join(problems))
    tally("bad input", inputs=len(SPEC), crashes=crashes)
    assert not failures, "\n\n".join(failures)


def test_stage_01_accounts_for_every_record_or_names_the_file(corpus, tmp_path):
    crashes = lost = 0
    failures = []
    for k, (name, case) in enumerate(SPEC.items()):
        path, want = corpus[name], case["prepare"]
        cfg = DataConfig(path=str(path), format=want.get("format", "auto"), columns=want.get("columns", {}),
                         val_fraction=0.0, test_fraction=0.0,
                         near_duplicate_threshold=want.get("near_duplicate_threshold", 0.9))
        paths = RunPaths(tmp_path, f"case{k}")
        try:
            res = prepare(cfg, paths, seed=0)
        except Exception as e:  # noqa: BLE001 - which exception it was is the test
            if "error" not in want:
                failures.append(f"{name}: {type(e).__name__}: {e}")
                crashes += not isinstance(e, tuple(ERRORS.values()))
            elif not isinstance(e, ERRORS[want["error"]]):
                failures.append(f"{name}: {type(e).__name__} ({e}), expected {want['error']}")
                crashes += not isinstance(e, tuple(ERRORS.values()))
            elif not re.search(want["match"].replace("{path}", re.escape(str(path))), str(e)):
                failures.append(f"{name}: {str(e)!r} does not match {want['match']!r}")
            elif str(path) not in str(e):
                failures.append(f"{name}: the error does not name {path}: {e}")
            continue
        if "error" in want:
            failures.append(f"{name}: stage 01 ran ({res.rows_in} in), expected {want['error']}")
            continue
        quarantined = read_jsonl(paths.quarantine)
        lost += res.rows_in - res.rows_kept - len(quarantined)
        got = (res.rows_in, res.rows_kept, dict(res.reasons))
        if got != (want["rows_in"], want["kept"], want["quarantined"]):
            failures.append(f"{name}: (in, kept, reasons) {got}, expected "
                            f"{(want['rows_in'], want['kept'], want['quarantined'])}")
        for q in quarantined:
            src, _, n = q["source"].rpartition(":")
            inside = src == str(path) or (path.is_dir() and src.startswith(f"{path}/"))
            if not (inside and n.isdigit() and q["reason"] and q["reason_code"]):
                failures.append(f"{name}: quarantined row without a path:N source and a reason: {q}")
    tally("bad input", inputs=len(SPEC), records_lost=lost, crashes=crashes)
    assert lost == 0 and not failures, "\n".join(failures)
