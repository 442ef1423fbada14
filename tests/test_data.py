import json

from ftkit.config import DataConfig
from ftkit.data import normalise_text, prepare
from ftkit.paths import RunPaths, read_jsonl


def test_normalise_text():
    assert normalise_text("  Hi \t there\r\nsecond  line  ") == "Hi there\nsecond line"
    assert normalise_text("Cafe\u0301") == "Café"


def test_demo_prepare_accounts_for_every_row(tmp_path):
    paths = RunPaths(tmp_path, "t")
    res = prepare(DataConfig(demo_size=400), paths, seed=3)
    m = res.metrics()
    assert m["rows_in"] == m["rows_kept"] + m["rows_quarantined"]
    assert m["quarantine_reasons"]["duplicate"] >= 1 and m["quarantine_reasons"]["empty_content"] >= 1
    quarantined = read_jsonl(paths.quarantine)
    assert len(quarantined) == m["rows_quarantined"]
    assert all(q["reason"] and "row" in q["source"] for q in quarantined)
    assert sum(m["rows"].values()) == m["rows_kept"]
    ids = {name: {c["conversation_id"] for c in read_jsonl(paths.split(name))} for name in ("train", "val", "test")}
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])


def test_splits_are_reproducible(tmp_path):
    a = prepare(DataConfig(demo_size=200), RunPaths(tmp_path, "a"), seed=1)
    b = prepare(DataConfig(demo_size=200), RunPaths(tmp_path, "b"), seed=1)
    c = prepare(DataConfig(demo_size=200), RunPaths(tmp_path, "c"), seed=2)
    def content(res):
        return {k: [(c["conversation_id"], [(t["user"], t["assistant"]) for t in c["turns"]]) for c in v]
                for k, v in res.splits.items()}

    assert content(a) == content(b)
    assert content(a)["test"] != content(c)["test"]


def test_user_file_problems_are_quarantined_with_reasons(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text("\n".join([
        json.dumps({"question": "How do I reset?", "answer": "Click reset."}),
        "{not json",
        json.dumps({"question": "Only a question"}),
        json.dumps({"question": "Empty", "answer": "   "}),
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}),
    ]) + "\n")
    cfg = DataConfig(path=str(f), user_column="question", assistant_column="answer", conversation_column=None,
                     turn_column=None, val_fraction=0.0, test_fraction=0.0)
    res = prepare(cfg, RunPaths(tmp_path, "u"), seed=0)
    assert res.rows_in == 5 and res.rows_kept == 2
    reasons = {q["source"].split(":")[-1]: q["reason"] for q in res.quarantined}
    assert reasons["line 2"].startswith("invalid JSON")
    assert "no column 'answer'" in reasons["line 3"]
    assert reasons["line 4"] == "field 'answer' is empty or whitespace only"
