import gzip
import json

import pytest

from ftkit.core.readers import InputError, encoding_problem, iter_records

CP1252 = "café – 5 € – it’s"  # é, € and ’ are one byte each in cp1252, and not valid UTF-8 that way


def located(path, encoding="utf-8"):
    """(N of "path:N", record, error) per record; the location must be the path and one number."""
    out = []
    for loc in iter_records(path, encoding=encoding):
        where, _, n = loc.where.rpartition(":")
        assert where.startswith(str(path)) and n.isdigit(), loc.where
        out.append((int(n), loc.record, loc.error))
    return out


def test_jsonl_with_bom_blank_lines_and_errors(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_bytes("\ufeff".encode() + b'{"a": 1}\n\n{broken\n"text"\n')
    out = located(f)
    assert out[0] == (1, {"a": 1}, None)
    assert out[1][0] == 3 and out[1][2].startswith("invalid JSON")
    assert out[2] == (4, None, "expected a JSON object per record, got str")


def test_json_list_and_data_wrapper(tmp_path):
    (tmp_path / "l.json").write_text(json.dumps([{"a": 1}, {"a": 2}]))
    (tmp_path / "d.json").write_text(json.dumps({"data": [{"b": 1}]}))
    assert [r for _, r, _ in located(tmp_path / "l.json")] == [{"a": 1}, {"a": 2}]
    assert located(tmp_path / "d.json") == [(1, {"b": 1}, None)]


def test_csv_tsv_parquet_datasets_text(tmp_path):
    (tmp_path / "c.csv").write_bytes("\ufeffuser,assistant\nhi,\"hello, there\"\nx,y,z\n".encode())
    out = located(tmp_path / "c.csv")
    assert out[0] == (1, {"user": "hi", "assistant": "hello, there"}, None)
    assert "more cell(s) than the header" in out[1][2]
    (tmp_path / "t.tsv").write_text("q\ta\nwhy\tbecause\n")
    assert located(tmp_path / "t.tsv") == [(1, {"q": "why", "a": "because"}, None)]

    import pandas as pd
    from datasets import Dataset

    pd.DataFrame({"prompt": ["p1", "p2"], "completion": ["c1", "c2"]}).to_parquet(tmp_path / "p.parquet")
    assert [r for _, r, _ in located(tmp_path / "p.parquet")] == [{"prompt": "p1", "completion": "c1"},
                                                                   {"prompt": "p2", "completion": "c2"}]
    Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(tmp_path / "ds"))
    assert [r for _, r, _ in located(tmp_path / "ds")] == [{"text": "a"}, {"text": "b"}]
    (tmp_path / "doc.txt").write_text("first para\nline two\n\n\nsecond para\n")
    assert located(tmp_path / "doc.txt") == [(1, {"text": "first para\nline two"}, None),
                                              (5, {"text": "second para"}, None)]


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


def test_json_records_are_located_by_their_line(tmp_path):
    f = tmp_path / "pretty.json"
    f.write_text(json.dumps([{"a": 1}, {"a": [2, 3]}, "x"], indent=2))
    starts = [n for n, line in enumerate(f.read_text().splitlines(), 1) if line in ("  {", '  "x"')]
    assert [(n, r, e is not None) for n, r, e in located(f)] == [(starts[0], {"a": 1}, False),
                                                                (starts[1], {"a": [2, 3]}, False), (starts[2], None, True)]
    w = tmp_path / "wrapped.json"  # the records under "data", after another key with a list of its own
    w.write_text('{"meta": [{"no": 1}],\n "data": [\n  {"b": 1},\n\n  {"b": 2}]}\n')
    assert located(w) == [(3, {"b": 1}, None), (5, {"b": 2}, None)]


def test_invalid_utf8_jsonl_quarantines_only_that_line(tmp_path):
    f = tmp_path / "mixed.jsonl"
    good = [json.dumps({"text": "first"}), json.dumps({"text": "third"})]
    data = (good[0] + "\n" + json.dumps({"text": CP1252}, ensure_ascii=False) + "\n" + good[1] + "\n").encode("cp1252")
    f.write_bytes(data)
    out = located(f)
    assert len(out) == 3  # records in = kept + quarantined
    assert [(n, r) for n, r, e in out if e is None] == [(1, {"text": "first"}), (3, {"text": "third"})]
    n, record, error = out[1]
    assert (n, record) == (2, None)
    assert error == (f"invalid UTF-8 at byte {data.index('é'.encode('cp1252'))}; set data.encoding (e.g. cp1252 or "
                     "latin-1), or --encoding on the command line")
    assert located(f, "cp1252")[1] == (2, {"text": CP1252}, None)  # read exactly, not patched


def test_invalid_bytes_in_csv_name_the_row_and_the_physical_line(tmp_path):
    f = tmp_path / "export.csv"
    # row 1 spans lines 2-3 (a quoted line break), so row 2 is line 4
    data = f'q,a\n"multi\nline",ok\nbad,{CP1252}\nfine,{CP1252}\n'.encode("cp1252")
    f.write_bytes(data)
    out = located(f)
    assert len(out) == 3
    assert out[0] == (1, {"q": "multi\nline", "a": "ok"}, None)
    first_bad = data.index("é".encode("cp1252"))
    assert out[1] == (2, None, f"line 4: invalid UTF-8 at byte {first_bad}; set data.encoding (e.g. cp1252 or "
                               "latin-1), or --encoding on the command line")
    assert out[2][:2] == (3, None) and out[2][2].startswith("line 5: invalid UTF-8 at byte ")
    assert [r for _, r, _ in located(f, "cp1252")][1:] == [{"q": "bad", "a": CP1252}, {"q": "fine", "a": CP1252}]
    header = tmp_path / "header.csv"
    header.write_bytes("frage,antwort_für\nx,y\n".encode("cp1252"))
    [loc] = iter_records(header)  # wrong column names would spoil every row: the file is one unreadable record
    assert loc.where == str(header) and loc.error.startswith(
        "line 1 (the header): invalid UTF-8 at byte 15 (the whole file is unreadable until this is fixed); set")


def test_invalid_bytes_in_text_and_whole_json(tmp_path):
    t = tmp_path / "doc.txt"
    t.write_bytes("one\n\ntwo\nand caf\xe9\n\nthree\n".encode("latin-1"))
    assert [(n, r) for n, r, _ in located(t)] == [(1, {"text": "one"}), (3, None), (6, {"text": "three"})]
    assert located(t)[1][2].startswith(f"line 4: invalid UTF-8 at byte {t.read_bytes().index(0xE9)};")
    j = tmp_path / "list.json"
    j.write_bytes('[\n  {"a": "x"},\n  {"a": "caf\xe9"}\n]'.encode("latin-1"))
    [(n, record, error)] = located(j)
    assert (n, record) == (3, None)
    assert error.startswith(f"invalid UTF-8 at byte {j.read_bytes().index(0xE9)} (the whole file is unreadable until "
                            "this is fixed); set data.encoding")
    assert [r for _, r, _ in located(j, "latin-1")] == [{"a": "x"}, {"a": "café"}]


def test_encoding_names_are_checked():
    assert encoding_problem("utf-8") is None and encoding_problem("CP1252") is None
    assert "unknown text encoding" in encoding_problem("utf-9")
    assert "iconv -f utf-16 -t utf-8" in encoding_problem("utf-16")  # \n is not the byte 0x0a there
    with pytest.raises(InputError, match="unknown text encoding"):
        list(iter_records("whatever.jsonl", encoding="nope"))


def test_gzipped_files_read_like_their_plain_forms(tmp_path):
    plain = {"a.jsonl": '{"a": 1}\n\n{"a": 2}\n', "b.csv": "user,assistant\nhi,\"hello, there\"\n",
             "c.txt": "para one\n\npara two\n"}
    for name, text in plain.items():
        (tmp_path / name).write_text(text)
        with gzip.open(tmp_path / f"{name}.gz", "wt") as f:
            f.write(text)
        assert located(tmp_path / f"{name}.gz") == located(tmp_path / name)
    (tmp_path / "folder").mkdir()
    (tmp_path / "a.jsonl.gz").rename(tmp_path / "folder" / "a.jsonl.gz")
    assert [r for _, r, _ in located(tmp_path / "folder")] == [{"a": 1}, {"a": 2}]


def test_a_gz_that_is_not_gzip_is_one_clear_error(tmp_path):
    fake = tmp_path / "export.csv.gz"
    fake.write_text("q,a\nx,y\n")
    with pytest.raises(InputError, match=f"^{fake}: not a gzip file; remove '.gz' from its name if it is a plain csv"):
        list(iter_records(fake))
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(b'{"a": 1}\n' * 1000)[:60])
    with pytest.raises(InputError, match="cut.jsonl.gz: the gzip data is damaged"):
        list(iter_records(cut))
    with pytest.raises(InputError, match="unsupported file type '.gz'"):
        (tmp_path / "x.gz").write_bytes(gzip.compress(b"x"))
        list(iter_records(tmp_path / "x.gz"))


def test_xlsx_first_sheet_rows_located_like_csv(tmp_path):
    from openpyxl import Workbook

    wb = Workbook()
    ws = wb.active
    ws.append(["question", "answer", "turn"])
    ws.append(["Where is my order?", "It ships today.", 1])
    ws.append(["Empty answer", None, 2.0])
    ws.append([])  # an empty row is no record; the rows after it keep their spreadsheet number
    ws.append(["Extra", "cell", 3, "beyond the header"])
    ws.append(["=1+1 is a formula?", "no, a string", None])
    wb.create_sheet("second").append(["ignored", "sheet"])
    wb.save(tmp_path / "export.xlsx")
    out = located(tmp_path / "export.xlsx")
    assert out[:2] == [(1, {"question": "Where is my order?", "answer": "It ships today.", "turn": "1"}, None),
                       (2, {"question": "Empty answer", "answer": "", "turn": "2"}, None)]
    assert out[2][:2] == (4, None) and "1 cell(s) right of the header's 3 columns" in out[2][2]
    assert out[3][0] == 5 and len(out) == 4
    with gzip.open(tmp_path / "export.xlsx.gz", "wb") as f:
        f.write((tmp_path / "export.xlsx").read_bytes())
    assert located(tmp_path / "export.xlsx.gz") == out
    (tmp_path / "broken.xlsx").write_text("not a zip")
    with pytest.raises(InputError, match="broken.xlsx: not a readable .xlsx workbook"):
        list(iter_records(tmp_path / "broken.xlsx"))
