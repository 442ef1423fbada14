import json

import pytest

from ftkit.readers import InputError, iter_records


def located(path):
    return [(loc.where.split(":")[-1], loc.record, loc.error) for loc in iter_records(path)]


def test_jsonl_with_bom_blank_lines_and_errors(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_bytes("\ufeff".encode() + b'{"a": 1}\n\n{broken\n"text"\n')
    out = located(f)
    assert out[0] == ("line 1", {"a": 1}, None)
    assert out[1][0] == "line 3" and out[1][2].startswith("invalid JSON")
    assert out[2] == ("line 4", None, "expected a JSON object per record, got str")


def test_json_list_and_data_wrapper(tmp_path):
    (tmp_path / "l.json").write_text(json.dumps([{"a": 1}, {"a": 2}]))
    (tmp_path / "d.json").write_text(json.dumps({"data": [{"b": 1}]}))
    assert [r for _, r, _ in located(tmp_path / "l.json")] == [{"a": 1}, {"a": 2}]
    assert located(tmp_path / "d.json") == [("item 1", {"b": 1}, None)]


def test_csv_tsv_parquet_datasets_text(tmp_path):
    (tmp_path / "c.csv").write_bytes("\ufeffuser,assistant\nhi,\"hello, there\"\nx,y,z\n".encode())
    out = located(tmp_path / "c.csv")
    assert out[0] == ("row 1", {"user": "hi", "assistant": "hello, there"}, None)
    assert "more cell(s) than the header" in out[1][2]
    (tmp_path / "t.tsv").write_text("q\ta\nwhy\tbecause\n")
    assert located(tmp_path / "t.tsv") == [("row 1", {"q": "why", "a": "because"}, None)]

    import pandas as pd
    from datasets import Dataset

    pd.DataFrame({"prompt": ["p1", "p2"], "completion": ["c1", "c2"]}).to_parquet(tmp_path / "p.parquet")
    assert [r for _, r, _ in located(tmp_path / "p.parquet")] == [{"prompt": "p1", "completion": "c1"},
                                                                   {"prompt": "p2", "completion": "c2"}]
    Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(tmp_path / "ds"))
    assert [r for _, r, _ in located(tmp_path / "ds")] == [{"text": "a"}, {"text": "b"}]
    (tmp_path / "doc.txt").write_text("first para\nline two\n\n\nsecond para\n")
    assert located(tmp_path / "doc.txt") == [("line 1", {"text": "first para\nline two"}, None),
                                              ("line 5", {"text": "second para"}, None)]


def test_folder_glob_and_list(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "1.jsonl").write_text('{"a": 1}\n')
    (tmp_path / "in" / "2.csv").write_text("a\n2\n")
    (tmp_path / "in" / "notes.docx").write_text("ignored: not a data file")
    assert len(located(tmp_path / "in")) == 2
    assert len(list(iter_records(str(tmp_path / "in" / "*.jsonl")))) == 1
    assert len(list(iter_records([tmp_path / "in" / "1.jsonl", tmp_path / "in" / "2.csv"]))) == 2
    with pytest.raises(InputError, match="no such file or folder"):
        list(iter_records(tmp_path / "missing.jsonl"))
    with pytest.raises(InputError, match="unsupported file type '.docx'"):
        list(iter_records(tmp_path / "in" / "notes.docx"))
