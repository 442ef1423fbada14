"""Every major open chat-model family through stages 01-05 on data that is not the demo's.

A tiny random model of each family's architecture, with a tokenizer trained here holding that family's
special tokens and the family's own chat template (tests/families.py), runs prepare → convert → train →
evaluate → merge, serve, train/serve check and GGUF export through ftkit's own functions. Each run checks
the end-of-turn token, the mask on every example (multi-turn included), the saved stop ids, the served
prompts equal to the training tokens, the Modelfile (or the reason there is none), and that no demo
string appears anywhere under the run's outputs.
"""

from __future__ import annotations

import json
import re

import pytest
from families import BY_NAME, FAMILIES, build_model_dir, template_path

from ftkit.host import consistency

DEMO_STRINGS = re.compile(r"AcmeCorp|AC-\d{6}|— AcmeCorp Support")


def neutral_records() -> list[dict]:
    recs = []
    for a in range(2, 40):
        b = (a * 7) % 11 + 1
        recs.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    for a in range(2, 12):
        recs.append({"messages": [{"role": "user", "content": f"What is {a} times 3?"},
                                  {"role": "assistant", "content": f"{a} times 3 is {3 * a}."},
                                  {"role": "user", "content": "And times 4?"},
                                  {"role": "assistant", "content": f"{a} times 4 is {4 * a}."}]})
    return recs


def corpus(records) -> list[str]:
    texts = [m["content"] for r in records for m in r["messages"]]
    return texts * 3 + ["Answer in one short sentence. You are a helpful assistant. Today Date Knowledge Cutoff"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "support_export.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in neutral_records()), encoding="utf-8")
    return path


needs_templates = pytest.mark.skipif(not template_path("Qwen-Qwen3-0.6B.jinja").exists(),
                                     reason="llama.cpp's templates not fetched: make thirdparty")


@needs_templates
@pytest.mark.parametrize("family", [f.name for f in FAMILIES])
def test_family_end_to_end(family, data_file, tmp_path):
    import ftkit
    from ftkit.convert import conversion
    from ftkit.core.files import read_jsonl
    from ftkit.core.masking import end_of_turn_token_id
    from ftkit.host import client as host
    from ftkit.host import gguf as gguf_export
    from ftkit.host import merge as export

    fam = BY_NAME[family]
    model_dir = build_model_dir(fam, tmp_path / "model", corpus(neutral_records()))
    cfg = ftkit.load_config(
        experiment=family, outputs_dir=str(tmp_path / "out"), model={"name": str(model_dir)},
        data={"path": str(data_file)}, convert={"max_seq_len": 2048},
        train={"max_steps": 2, "batch_size": 4, "logging_steps": 1, "eval_steps": 0, "max_eval_examples": 4},
        evaluate={"num_generations": 2, "max_new_tokens": 6, "max_examples": 6, "bootstrap_samples": 50,
                  "prompting": {"few_shot": 1}, "forgetting": {"num_generations": 2, "max_new_tokens": 6}},
        host={"consistency_examples": 3, "consistency_max_tokens": 6, "min_stop_rate": 0.0, "max_tokens_cap": 32},
    )
    paths = ftkit.run_paths(cfg)

    prep = ftkit.data.dataset.prepare(cfg.data, paths, cfg.seed)  # 01
    assert prep.metrics()["rows_in"] == len(neutral_records())

    tok = conversion.run_tokenizer(cfg, paths)  # 02
    eot = end_of_turn_token_id(tok)
    assert tok.convert_ids_to_tokens(eot) == fam.end_of_turn
    conv = conversion.convert(cfg, paths, tok)
    refused = {q["reason_code"] for q in conv.quarantined}
    multi_turn = [r for r in read_jsonl(paths.chat("train")) if sum(m["role"] == "assistant" for m in r["messages"]) > 1]
    assert not refused and multi_turn, conv.quarantined[:1]
    per_reply = [t for t in read_jsonl(paths.tokens("train")) if "#" in str(t["id"])]
    if family == "qwen3":  # its template drops earlier replies' reasoning: one example per reply, the last trained
        assert len(per_reply) == 2 * len(multi_turn) == 2 * conv.per_reply["train"]
        first, second = (t for t in per_reply if t["id"].split("#")[0] == multi_turn[0]["id"])
        assert tok.decode([x for x, y in zip(second["input_ids"], second["labels"], strict=True) if y != -100]).count(
            fam.end_of_turn) == 1  # the earlier reply is context, not trained again
    else:
        assert not per_reply and conv.per_reply["train"] == 0

    train_metrics = ftkit.train.launch.train(cfg, paths)  # 03
    assert train_metrics["steps"] == 2

    ev = ftkit.evaluate.evaluation.evaluate_run(cfg, paths)  # 04
    assert ev["generations"] if "generations" in ev else True

    merge = export.merge_adapter(cfg, paths, host.check_prompts(paths))  # 05
    assert merge["merge_passed"] if "merge_passed" in merge else True
    from transformers import GenerationConfig

    stops = GenerationConfig.from_pretrained(paths.merged_dir).eos_token_id
    assert eot in (stops if isinstance(stops, list) else [stops])
    server = host.start_server(cfg, paths)
    try:
        check = consistency.consistency_check(server, cfg, paths)
        answers = host.ask_all(server, cfg, paths)
        if fam.plain:  # a reasoning vocabulary: the <think> block is served apart from the answer
            _check_reasoning_split(server, cfg, paths)
    finally:
        assert server.stop() == 0
    assert check["consistency_prompts_match"], check["consistency_reason"]
    assert len(answers) == 3 and all(a["prompt"] for a in answers)
    for a in answers:  # greedy: streamed as returned whole, reasoning and answer alike
        assert a["streamed_reply"] == a["reply"] and ((a["streamed_reasoning"] or "").strip() or None) == a["reasoning"]
    exports = gguf_export.export_all(paths.merged_dir, paths, cfg.host.gguf_types, host.check_prompts(paths, n=2))
    for g in exports["gguf"]:
        assert g["passed"], g
    assert exports["gguf"] or exports["gguf_skipped"]  # written and checked, or skipped with the reason
    if exports.get("modelfile"):
        text = paths.modelfile.read_text(encoding="utf-8")
        assert f'PARAMETER stop "{fam.end_of_turn}"' in text and "{{ .Content }}" in text

    leaked = [str(p) for p in paths.root.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl", ".txt", ".log", "")
              and DEMO_STRINGS.search(p.read_text(encoding="utf-8", errors="ignore"))]
    assert not leaked, leaked


def _check_reasoning_split(server, cfg, paths):
    from ftkit.core import reasoning
    from ftkit.core.modeling import load_tokenizer
    from ftkit.host import client as host

    tok = load_tokenizer(str(paths.merged_dir))
    markers = reasoning.markers_for(tok)
    assert markers, "the vocabulary holds <think> and </think>"
    client = host.client_for(server, cfg.host.api_key)
    messages = host.served_prompts(cfg, paths)[0]
    resp = client.chat.completions.create(model=client.models.list().data[0].id, messages=messages, max_tokens=24,
                                          extra_body={"return_token_ids": True})
    msg, ids = resp.choices[0].message, resp.choices[0].model_extra["token_ids"]
    raw = tok.decode([t for t in ids if t not in server_stop_ids(tok)], skip_special_tokens=True)
    assert (msg.model_extra["reasoning_content"], msg.content) == reasoning.split(raw, markers), raw


def server_stop_ids(tok):
    from ftkit.core.modeling import stop_token_ids

    return set(stop_token_ids(tok))
