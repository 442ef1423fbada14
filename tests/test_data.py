import gzip
import json
import re

import pytest

from ftkit.core.config import DataConfig
from ftkit.core.files import read_jsonl
from ftkit.core.formats import FormatError
from ftkit.core.paths import RunPaths
from ftkit.data.dataset import prepare


def test_demo_prepare_accounts_for_every_row(tmp_path):
    paths = RunPaths(tmp_path, "t")
    res = prepare(DataConfig(demo_size=400), paths, seed=3)
    m = res.metrics()
    assert m["format"] == "columns"
    assert m["rows_in"] == m["rows_kept"] + m["rows_quarantined"]
    assert m["quarantine_reasons"]["duplicate"] >= 1 and m["quarantine_reasons"]["empty_content"] >= 1
    quarantined = read_jsonl(paths.quarantine)
    assert len(quarantined) == m["rows_quarantined"]
    assert quarantined and all(q["reason"] and re.fullmatch(r"[^:]+:\d+", q["source"]) for q in quarantined)
    assert sum(m["rows"].values()) == m["rows_kept"]
    ids = {name: {c["id"] for c in read_jsonl(paths.split(name))} for name in ("train", "val", "test")}
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    multi = [c for c in read_jsonl(paths.split("train")) if len(c["messages"]) > 2]
    assert multi and all(len(c["sources"]) == len(c["messages"]) // 2 for c in multi)


def test_splits_are_reproducible(tmp_path):
    def content(name):
        prepare(DataConfig(demo_size=200), RunPaths(tmp_path, name), seed=2 if name == "c" else 1)
        paths = RunPaths(tmp_path, name)
        return {k: [(c["id"], c["messages"]) for c in read_jsonl(paths.split(k))] for k in ("train", "val", "test")}

    a, b, c = content("a"), content("b"), content("c")
    assert a == b
    assert a["test"] != c["test"]


def test_user_file_problems_are_quarantined_with_reasons(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text("\n".join([
        json.dumps({"question": "How do I reset?", "answer": "Click reset."}),
        "{not json",
        json.dumps({"question": "Only a question"}),
        json.dumps({"question": "Empty", "answer": "   "}),
        json.dumps({"question": "How do I reset?", "answer": "Click reset."}),
        "[1, 2]",
    ]) + "\n")
    cfg = DataConfig(path=str(f), val_fraction=0.0, test_fraction=0.0)
    res = prepare(cfg, RunPaths(tmp_path, "u"), seed=0)
    assert res.detection.format == "columns" and res.detection.columns == {"user": "question", "assistant": "answer"}
    assert res.rows_in == 6 and res.rows_kept == 1
    reasons = {q["source"].split(":")[-1]: q["reason"] for q in res.quarantined}
    assert reasons["2"].startswith("invalid JSON")
    assert reasons["3"] == "answer: missing"
    assert reasons["4"] == "messages[1].content: empty or whitespace-only assistant message"
    assert reasons["5"] == f"exact duplicate of {f}:1"
    assert reasons["6"] == "expected a JSON object per record, got list"


def test_data_encoding_reaches_the_reader_and_bad_bytes_are_quarantined(tmp_path):
    f = tmp_path / "export.jsonl.gz"  # a gzipped cp1252 export: é, € and ’ are single bytes there
    rows = [{"question": "Plain ASCII?", "answer": "Yes."}]
    rows += [{"question": f"Question {i} about the café?", "answer": f"It’s {i} € – tax included."} for i in range(3)]
    with gzip.open(f, "wb") as out:
        out.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("cp1252"))
    kw = {"path": str(f), "val_fraction": 0.0, "test_fraction": 0.0, "near_duplicate_threshold": None}
    res = prepare(DataConfig(**kw), RunPaths(tmp_path, "utf8"), seed=0)
    assert (res.rows_in, res.rows_kept, res.reasons["unreadable"]) == (4, 1, 3)  # in = kept + quarantined
    assert [int(q["source"].rsplit(":", 1)[1]) for q in res.quarantined] == [2, 3, 4]
    assert all(re.fullmatch(rf"{re.escape(str(f))}:\d+", q["source"]) and "invalid UTF-8 at byte" in q["reason"]
               and "set data.encoding" in q["reason"] for q in res.quarantined)
    res = prepare(DataConfig(**kw, encoding="cp1252"), RunPaths(tmp_path, "cp"), seed=0)
    assert res.rows_kept == 4
    train = read_jsonl(RunPaths(tmp_path, "cp").split("train"))
    assert sorted(c["messages"][1]["content"] for c in train) == sorted(r["answer"] for r in rows)
    f.write_bytes(gzip.compress(json.dumps(rows[1], ensure_ascii=False).encode("cp1252")))
    with pytest.raises(FormatError, match=rf"first unreadable record: {re.escape(str(f))}:1: invalid UTF-8 at byte"):
        prepare(DataConfig(**kw), RunPaths(tmp_path, "none"), seed=0)  # nothing readable: the error says why


def test_stratified_and_grouped_splits(tmp_path):
    rows = [{"q": f"question number {i} about topic {i % 4}", "a": f"answer {i} " * 3, "intent": f"i{i % 4}",
             "customer": f"c{i // 3}"} for i in range(200)]
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    cols = {"user": "q", "assistant": "a"}
    strat = prepare(DataConfig(path=str(f), columns=cols, label_column="intent", near_duplicate_threshold=None),
                    RunPaths(tmp_path, "s"), seed=0)
    assert strat.stats["test"]["labels"].count("i0") == 5
    for split in ("val", "test"):
        intents = [r["meta"]["intent"] for r in read_jsonl(RunPaths(tmp_path, "s").split(split))]
        assert {intents.count(f"i{k}") for k in range(4)} == {5}  # 20 records, 5 per intent
    prepare(DataConfig(path=str(f), columns=cols, group_column="customer", near_duplicate_threshold=None),
                      RunPaths(tmp_path, "g"), seed=0)
    owners = {s: {r["meta"]["customer"] for r in read_jsonl(RunPaths(tmp_path, "g").split(s))}
              for s in ("train", "val", "test")}
    assert not (owners["train"] & owners["val"]) and not (owners["train"] & owners["test"])


def test_near_duplicates_and_leakage(tmp_path):
    base = ("my parcel with the blue camping stove never arrived and I need it for the trip this weekend, "
            "the tracking page has said out for delivery since Monday and nobody answers the phone at the depot")
    rows = [{"prompt": base + f" ticket {i}", "completion": "Sorry about that, I have asked the carrier to call you."}
            for i in range(4)]
    rows += [{"prompt": f"unrelated question {i} " + "lorem ipsum " * (i % 7), "completion": f"answer {i}"}
             for i in range(60)]
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    res = prepare(DataConfig(path=str(f), near_duplicate_threshold=0.8), RunPaths(tmp_path, "n"), seed=0)
    near = [q for q in res.quarantined if q["reason_code"] == "near_duplicate"]
    assert near and "near-duplicate (Jaccard ≈" in near[0]["reason"]
    # near-duplicates removed before the split: nothing left to leak
    leak = res.metrics()["leakage"]
    assert leak["threshold"] == 0.8 and leak["val"]["near_duplicates_in_train"] == leak["test"]["near_duplicates_in_train"] == 0

    # with the removal off, the copies land on both sides of the split and the report names each pair
    res = prepare(DataConfig(path=str(f), near_duplicate_threshold=None, val_fraction=0.25, test_fraction=0.25),
                  RunPaths(tmp_path, "leak"), seed=0)
    leak = res.metrics()["leakage"]
    copies = {c["id"] for c in read_jsonl(RunPaths(tmp_path, "leak").split("train"))
              if "camping stove" in c["messages"][0]["content"]}
    held = [e for name in ("val", "test") for e in leak[name]["examples"]]
    found = sum(leak[name]["near_duplicates_in_train"] for name in ("val", "test"))
    assert copies and found == 4 - len(copies) and len(held) == found
    assert all(e["train"] in copies and e["jaccard"] >= 0.8 for e in held)


def test_unsupported_input_is_a_clear_error(tmp_path):
    (tmp_path / "x.docx").write_text("x")
    with pytest.raises(ValueError, match=r"x.docx: unsupported file type '.docx'"):
        prepare(DataConfig(path=str(tmp_path / "x.docx")), RunPaths(tmp_path, "e"), seed=0)


def _seed_replay_cache(cfg, paths: RunPaths, answers: list[str]) -> None:
    """The replay cache as the base model fills it: ``answers`` to the first shipped general prompts,
    every prompt asked (a random model rarely stops by itself, so tests cannot generate these)."""
    from ftkit.core.replay import cache_key, general_prompts

    paths.replay_cache.parent.mkdir(parents=True, exist_ok=True)
    paths.replay_cache.write_text("\n".join(json.dumps(
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}],
         "meta": {"source": "replay", **cache_key(cfg), "asked": len(general_prompts())}})
        for p, a in zip(general_prompts(), answers, strict=False)) + "\n")


def test_forgetting_guard_self_distillation(tmp_path):
    """The base model's own answers to shipped general prompts join train only, marked as replay."""
    from ftkit.core.config import load_config
    from ftkit.core.replay import general_prompts, mix_general

    cfg = load_config(experiment="g", outputs_dir=str(tmp_path), model={"name": "tiny-random"},
                      data={"demo_size": 100, "general_mix": 0.1})
    paths = RunPaths(tmp_path, "g")
    res = prepare(cfg.data, paths, cfg.seed)
    n_train = res.split_sizes["train"]
    # a random model rarely stops by itself: pre-seed the cache as a real base model would fill it
    _seed_replay_cache(cfg, paths, ["An answer."] * len(general_prompts()))
    info = mix_general(cfg, paths, res)
    train = read_jsonl(paths.split("train"))
    assert info["added"] == round(0.1 * n_train) and len(train) == n_train + info["added"]
    assert sum(1 for r in train if r["meta"].get("source") == "replay") == info["added"]
    assert all(r["meta"].get("source") != "replay" for r in read_jsonl(paths.split("test")))
    assert res.metrics()["general_mix"]["source"] == "self-distillation (base model)"


def test_forgetting_guard_repeats_a_small_pool_to_the_configured_share(tmp_path):
    """Fewer usable general answers than the mix asks for: each is repeated in turn, and the report says how many
    were distinct."""
    from ftkit.core.config import load_config
    from ftkit.core.replay import mix_general

    cfg = load_config(experiment="g", outputs_dir=str(tmp_path), model={"name": "tiny-random"},
                      data={"demo_size": 100, "general_mix": 0.2})
    paths = RunPaths(tmp_path, "g")
    res = prepare(cfg.data, paths, cfg.seed)
    n_train = res.split_sizes["train"]
    _seed_replay_cache(cfg, paths, [f"Answer {k}." for k in range(3)])
    info = mix_general(cfg, paths, res)
    replay = [r for r in read_jsonl(paths.split("train")) if r["meta"].get("source") == "replay"]
    assert info["wanted"] == info["added"] == len(replay) == round(0.2 * n_train) > 3 and info["distinct"] == 3
    counts = [sum(1 for r in replay if r["messages"][-1]["content"] == f"Answer {k}.") for k in range(3)]
    assert max(counts) - min(counts) <= 1  # repeated in turn, not one of them over and over


def test_forgetting_guard_generates_with_base_model(tmp_path):
    from ftkit.core.config import load_config
    from ftkit.core.replay import self_distilled

    cfg = load_config(model={"name": "tiny-random"})
    out = self_distilled(cfg, 4, tmp_path / "replay.jsonl")
    assert (tmp_path / "replay.jsonl").exists()
    assert all(r["meta"]["source"] == "replay" and r["messages"][0]["role"] == "user" for r in out)


def test_self_distilled_answers_are_cached(tmp_path, monkeypatch):
    """A rerun reads the answers back (even when some prompts got no usable answer); another system
    prompt, or more prompts than were asked, generates again."""
    from ftkit.core import generation
    from ftkit.core.config import load_config
    from ftkit.core.replay import self_distilled

    calls = []
    real = generation.generate

    def counting(model, tok, chats, **kw):
        calls.append(len(chats))
        gens = real(model, tok, chats, **kw)
        # a random model rarely ends by itself: here every answer but the first does
        return [{**g, "text": g["text"] or "An answer.", "stopped": i != 0} for i, g in enumerate(gens)]

    monkeypatch.setattr(generation, "generate", counting)
    cache = tmp_path / "replay.jsonl"
    cfg = load_config(model={"name": "tiny-random"}, train={"max_steps": 1})
    first = self_distilled(cfg, 3, cache)
    assert calls == [3] and len(first) == 2
    assert self_distilled(cfg, 3, cache) == first
    from ftkit.core.replay import general_prompts

    two = set(general_prompts()[:2])
    assert self_distilled(cfg, 2, cache) == [r for r in first if r["messages"][0]["content"] in two]
    assert calls == [3]  # both answered from the cache
    self_distilled(load_config(model={"name": "tiny-random"}, convert={"system_prompt": "Be brief."}), 3, cache)
    self_distilled(cfg, 4, cache)
    assert calls == [3, 3, 4]
    longer = load_config(model={"name": "tiny-random"}, data={"general_max_new_tokens": 8})
    self_distilled(longer, 4, cache)  # another token cap: other answers
    assert calls == [3, 3, 4, 4]
    greedy = load_config(model={"name": "tiny-random"}, data={"general_max_new_tokens": 8, "general_temperature": 0})
    self_distilled(greedy, 4, cache)  # greedy instead of sampled: other answers
    assert calls == [3, 3, 4, 4, 4]
    from ftkit.core import replay

    monkeypatch.setattr(replay, "_prompts_text", lambda: '{"prompt": "What is 2 + 2?"}\n')
    self_distilled(longer, 4, cache)  # other shipped prompts (an upgrade): asked again
    assert calls == [3, 3, 4, 4, 4, 1]


def test_self_distillation_samples_the_base_model_reproducibly(tmp_path, monkeypatch):
    """At data.general_temperature > 0 the answers are sampled (at that temperature, top_p 1: the base
    model's own distribution), and the same seed samples the same answers; 0 is greedy."""
    from ftkit.core import generation
    from ftkit.core.config import load_config
    from ftkit.core.replay import self_distilled

    seen = []
    real = generation.generate

    def recording(model, tok, chats, **kw):
        gens = real(model, tok, chats, **kw)
        seen.append((kw.get("do_sample", False), kw.get("temperature"), kw.get("top_p"), [g["text"] for g in gens]))
        return [{**g, "text": g["text"] or "An answer.", "stopped": True} for g in gens]

    monkeypatch.setattr(generation, "generate", recording)
    for i, (seed, temperature) in enumerate([(0, 1.0), (0, 1.0), (1, 1.0), (0, 0.0)]):
        cfg = load_config(model={"name": "tiny-random"}, seed=seed,
                          data={"general_max_new_tokens": 12, "general_temperature": temperature})
        self_distilled(cfg, 6, tmp_path / f"replay{i}.jsonl")
    (s1, t1, p1, a), (_, _, _, b), (_, _, _, c), (s0, _, _, g) = seen
    assert (s1, t1, p1) == (True, 1.0, 1.0) and s0 is False
    assert a == b and a != c and a != g


def test_unusable_general_records_are_named_not_dropped(tmp_path):
    from ftkit.core.replay import from_file

    f = tmp_path / "general.jsonl"
    good = {"messages": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"}]}
    bad = {"messages": [{"role": "user", "content": "No reply here."}]}
    f.write_text("\n".join(json.dumps(r) for r in (good, bad, good)) + "\n")
    skipped: list[str] = []
    recs = from_file(str(f), skipped=skipped)
    assert len(recs) == 2 and len(skipped) == 1 and skipped[0].startswith(f"{f}:2: ")


def test_atomic_writes_leave_nothing_half_written(tmp_path):
    from ftkit.core.files import atomic, write_jsonl

    target = tmp_path / "split.jsonl"
    with pytest.raises(OSError):
        write_jsonl(target, ({"i": i} if i < 3 else (_ for _ in ()).throw(OSError("No space left on device"))
                             for i in range(5)))
    assert not target.exists() and not list(tmp_path.iterdir())  # no partial file, no temp file left
    write_jsonl(target, [{"i": 1}])
    with pytest.raises(RuntimeError), atomic(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == '{"i": 1}\n' and [p.name for p in tmp_path.iterdir()] == ["split.jsonl"]
    with atomic(tmp_path / "model", directory=True) as d:
        (d / "config.json").write_text("{}")
    assert (tmp_path / "model" / "config.json").exists()


def test_duplicate_reports_do_not_depend_on_the_hash_seed():
    """Which earlier/train record a duplicate is reported against is the same in every process (ties among
    identical copies used to follow the order of a set, which changes with PYTHONHASHSEED)."""
    import subprocess
    import sys

    code = ("from ftkit.data.cleaning import cross_split_near_duplicates, near_duplicates\n"
            "t = ['the blue camping stove never arrived and the tracking page is stuck ' * 3] * 6 + ['other text'] * 2\n"
            "print(cross_split_near_duplicates(t, t[:1], 0.8), sorted(near_duplicates(t, 0.8).items()))\n")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": str(seed), "PATH": "/usr/bin"}).stdout for seed in (1, 2, 3, 4)}
    assert len(outs) == 1, outs
    assert "[(0, 0, 1.0)]" in outs.pop()
