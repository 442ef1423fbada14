"""`ftkit validate` and `ftkit convert` on a corpus of malformed files: one precise line per problem."""

import json
from pathlib import Path

import pytest

from ftkit.cli import main

MALFORMED = Path(__file__).parent / "data" / "malformed"
EXPECTED = {  # file -> (line, the one problem reported)
    "invalid_json.jsonl": ("line 2", "invalid JSON (Expecting ',' delimiter"),
    "wrong_type.jsonl": ("line 1", "messages[1].content: must be a string, got int"),
    "missing_key.jsonl": ("line 1", "messages[1].content: must be a string, got null"),
    "unknown_role.jsonl": ("line 1", "messages[1].role: unknown role 'agent'; use one of system, user, assistant, tool"),
    "system_not_first.jsonl": ("line 1", "messages[1]: a system message is only allowed first"),
    "no_alternation.jsonl": ("line 1", "messages[1].role: expected assistant after user, got 'user'"),
    "no_assistant.jsonl": ("line 1", "messages: no assistant message: nothing to train on"),
    "empty_content.jsonl": ("line 1", "messages[0].content: empty or whitespace-only user message"),
    "non_string_content.jsonl": ("line 1", "messages[0].content: must be a string, got list"),
    "not_an_object.jsonl": ("line 1", "expected a JSON object per record, got list"),
    "empty_cell.csv": ("row 2", "messages[1].content: empty or whitespace-only assistant message"),
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
    n_records = sum(1 for line in (MALFORMED / name).read_text().splitlines() if line.strip()) - name.endswith(".csv")
    assert f"{n_records} records: {n_records - 1} valid, 1 with problems" in err
    assert "Traceback" not in err


def test_mixed_file_counts_reconcile(capsys):
    code, lines, err = run(capsys, "validate", str(MALFORMED / "mixed.jsonl"))
    assert code == 1
    assert [line.split(": ", 1)[0].rsplit(":", 1)[1] for line in lines] == ["line 2", "line 3", "line 4"]
    assert "5 records: 2 valid, 3 with problems" in err


def test_all_files_at_once_never_crash(capsys):
    code, lines, err = run(capsys, "validate", "--format", "messages", *map(str, sorted(MALFORMED.glob("*.jsonl"))))
    assert code == 1 and "Traceback" not in err
    assert len(lines) == len([k for k in EXPECTED if k.endswith(".jsonl")]) + 3


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
