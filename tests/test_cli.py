"""`ftkit validate` and `ftkit convert` on a corpus of malformed files: one precise line per problem."""

import json
import re
from pathlib import Path

import pytest

from ftkit.cli import main

MALFORMED = Path(__file__).parent / "data" / "malformed"
LOCATION = re.compile(r"^[^:]+:\d+: ")  # path:LINE: or path:ROW:, the compiler convention
EXPECTED = {  # file -> (line, or data row for a CSV; the one problem reported)
    "invalid_json.jsonl": ("2", "invalid JSON (Expecting ',' delimiter"),
    "wrong_type.jsonl": ("1", "messages[1].content: must be a string, got int"),
    "missing_key.jsonl": ("1", "messages[1].content: must be a string, got null"),
    "unknown_role.jsonl": ("1", "messages[1].role: unknown role 'agent'; use one of system, user, assistant, tool"),
    "system_not_first.jsonl": ("1", "messages[1]: a system message is only allowed first"),
    "no_alternation.jsonl": ("1", "messages[1].role: expected assistant after user, got 'user'"),
    "no_assistant.jsonl": ("1", "messages: no assistant message: nothing to train on"),
    "empty_content.jsonl": ("1", "messages[0].content: empty or whitespace-only user message"),
    "non_string_content.jsonl": ("1", "messages[0].content: must be a string, got list"),
    "not_an_object.jsonl": ("1", "expected a JSON object per record, got list"),
    "empty_cell.csv": ("2", "messages[1].content: empty or whitespace-only assistant message"),
}


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out.splitlines(), out.err


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_one_precise_line_per_problem(capsys, name):
    code, lines, err = run(capsys, "validate", str(MALFORMED / name))
    where, reason = EXPECTED[name]
    assert code == 1
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{MALFORMED / name}:{where}: {reason}"), lines[0]
    assert LOCATION.match(lines[0])
    n_records = sum(1 for line in (MALFORMED / name).read_text().splitlines() if line.strip()) - name.endswith(".csv")
    assert f"{n_records} records: {n_records - 1} valid, 1 with problems" in err
    assert "Traceback" not in err


def test_mixed_file_counts_reconcile(capsys):
    code, lines, err = run(capsys, "validate", str(MALFORMED / "mixed.jsonl"))
    assert code == 1
    assert [line.split(": ", 1)[0].rsplit(":", 1)[1] for line in lines] == ["2", "3", "4"]
    assert "5 records: 2 valid, 3 with problems" in err


def test_all_files_at_once_never_crash(capsys):
    code, lines, err = run(capsys, "validate", "--format", "messages", *map(str, sorted(MALFORMED.glob("*.jsonl"))))
    assert code == 1 and "Traceback" not in err
    assert len(lines) == len([k for k in EXPECTED if k.endswith(".jsonl")]) + 3


def test_cp1252_export_fails_as_utf8_and_reads_exactly_with_encoding(tmp_path, capsys):
    rows = [("Is the café open?", "Yes, until 6 pm."), ("Price?", "It’s 5 € – with tax."), ("Ok", "Thanks")]
    f = tmp_path / "export.csv"
    f.write_bytes(("question,answer\n" + "".join(f'"{q}","{a}"\n' for q, a in rows)).encode("cp1252"))
    code, lines, err = run(capsys, "validate", str(f))
    assert code == 1 and "Traceback" not in err
    assert all(LOCATION.match(line) for line in lines), lines
    # row 1 is the first data row (line 2: the header is line 1)
    assert [line.split(": invalid UTF-8 at byte ")[0] for line in lines] == [f"{f}:1: line 2", f"{f}:2: line 3"]
    assert all("set data.encoding (e.g. cp1252 or latin-1), or --encoding on the command line" in x for x in lines)
    assert "3 records: 1 valid, 2 with problems [unreadable 2]" in err

    code, lines, err = run(capsys, "validate", "--encoding", "cp1252", str(f))
    assert code == 0 and lines == [] and "3 records: 3 valid" in err
    out = tmp_path / "train.jsonl"
    code, _, _ = run(capsys, "convert", "--encoding", "cp1252", str(f), "--to", "openai", "-o", str(out))
    assert code == 0
    written = [json.loads(x)["messages"] for x in out.read_text(encoding="utf-8").splitlines()]
    assert [(m[0]["content"], m[1]["content"]) for m in written] == rows  # é, € and ’ exactly, no U+FFFD

    code, lines, err = run(capsys, "validate", "--encoding", "utf-9", str(f))
    assert code == 2 and "error: --encoding 'utf-9': unknown text encoding" in err


def test_gz_that_is_not_gzip_is_one_error_line(tmp_path, capsys):
    fake = tmp_path / "export.jsonl.gz"
    fake.write_text('{"text": "plain"}\n')
    code, lines, err = run(capsys, "validate", str(fake))
    assert code == 2 and lines == [] and "Traceback" not in err
    assert err.splitlines()[0] == (f"error: {fake}: not a gzip file; remove '.gz' from its name if it is a plain "
                                   "jsonl file, or compress it with gzip")


def openai_format_errors(line: dict) -> list[str]:
    """An independent check of OpenAI's chat fine-tuning format (after its data-prep cookbook)."""
    errors = []
    if not isinstance(line, dict) or set(line) != {"messages"}:
        return ["data_type_or_keys"]
    msgs = line["messages"]
    if not isinstance(msgs, list) or not msgs:
        return ["missing_messages_list"]
    for m in msgs:
        if "role" not in m or "content" not in m:
            errors.append("message_missing_key")
        if any(k not in ("role", "content", "name", "function_call", "weight", "tool_calls", "tool_call_id")
               for k in m):
            errors.append("message_unrecognized_key")
        if m.get("role") not in ("system", "user", "assistant", "function", "tool"):
            errors.append("unrecognized_role")
        if not isinstance(m.get("content"), str) and not m.get("tool_calls"):
            errors.append("missing_content")
    if not any(m.get("role") == "assistant" for m in msgs):
        errors.append("example_missing_assistant_message")
    return errors


def test_convert_to_openai_leaves_bad_records_out(tmp_path, capsys):
    out = tmp_path / "train.jsonl"
    code, lines, err = run(capsys, "convert", str(MALFORMED / "mixed.jsonl"), "--to", "openai", "-o", str(out))
    assert code == 1 and len(lines) == 3
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(written) == 2
    assert all(openai_format_errors(x) == [] for x in written)


def test_convert_bitext_and_round_trip(tmp_path, capsys, root):
    bitext = root.parent / "shared" / "data" / "bitext-customer-support" / "bitext_customer_support_sample.csv"
    if not bitext.exists():
        pytest.skip("../shared/data/bitext-customer-support is not present")
    code, lines, err = run(capsys, "convert", str(bitext), "--columns", "user=instruction,assistant=response",
                           "--to", "openai", "-o", str(tmp_path / "b.jsonl"))
    assert code == 0 and lines == []
    assert "4,514 records: 4,514 valid, 0 with problems" in err
    rows = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert len(rows) == 4514 and all(openai_format_errors(r) == [] for r in rows)
    for target, name in (("sharegpt", "s.jsonl"), ("parquet", "p.parquet"), ("datasets", "ds")):
        code, _, _ = run(capsys, "convert", str(tmp_path / "b.jsonl"), "--to", target, "-o", str(tmp_path / name))
        assert code == 0
    code, lines, err = run(capsys, "validate", str(tmp_path / "s.jsonl"))
    assert code == 0 and "4,514 valid" in err and "sharegpt" in err
