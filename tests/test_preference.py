"""Preference tuning: every preference format read and checked, pairs tokenised with the serving template,
DPO's loss against a hand computation, the reference equal to the adapter-off model, KTO on unpaired
labels, and SFT then DPO through the stages with the report's answer."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from tests import thirdparty


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _convert(path, fmt="auto", columns=None):
    from ftkit.core import records
    from ftkit.core.validation import validate

    det = records.detect(path, fmt, columns)
    ok, bad = [], []
    for item in records.canonical(path, det):
        problems = item.problems or validate(item.record)
        (bad if problems else ok).append(f"{item.where}: {'; '.join(map(str, problems))}" if problems else item.record)
    return det, ok, bad


SAMPLES = {
    "openai_dpo": [{"input": {"messages": [{"role": "user", "content": "Where is my order?"}]},
                    "preferred_output": [{"role": "assistant", "content": "It ships today."}],
                    "non_preferred_output": [{"role": "assistant", "content": "No idea."}]}],
    "preference": [{"prompt": "2+2?", "chosen": "4", "rejected": "5"},
                   {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
                    "rejected": [{"role": "assistant", "content": "What."}]},
                   {"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],
                    "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}]},
                   {"instruction": "Name a colour", "input": "", "chosen": "Blue.", "rejected": "Seven."}],
    "kto": [{"prompt": "Q", "completion": "good", "label": True}, {"prompt": "Q", "completion": "bad", "label": False}],
}


@pytest.mark.parametrize("fmt", sorted(SAMPLES))
def test_each_preference_format_converts_with_zero_errors(tmp_path, fmt):
    det, ok, bad = _convert(_write(tmp_path / "p.jsonl", SAMPLES[fmt]))
    assert det.format == fmt and not bad and len(ok) == len(SAMPLES[fmt])
    for rec in ok:
        assert rec["messages"][-1]["role"] == "assistant"
        assert ("rejected" in rec) == (fmt != "kto") and ("label" in rec) == (fmt == "kto")
    if fmt == "preference":  # the implicit prompt is the shared turns
        assert ok[2]["messages"] == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}]
        assert ok[2]["rejected"] == {"role": "assistant", "content": "bad"}


def test_preference_columns_of_a_table(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("question,good,bad\nWhere is it?,On its way.,Dunno.\n", encoding="utf-8")
    det, ok, bad = _convert(str(p), columns={"user": "question", "chosen": "good", "rejected": "bad"})
    assert not bad and ok[0]["rejected"]["content"] == "Dunno." and ok[0]["messages"][-1]["content"] == "On its way."


def test_malformed_pairs_get_path_line_reasons(tmp_path):
    rows = [SAMPLES["openai_dpo"][0],
            {**SAMPLES["openai_dpo"][0], "non_preferred_output": [{"role": "assistant", "content": "It ships today."}]},
            {"input": {"messages": [{"role": "user", "content": "x"}]}, "preferred_output": [{"role": "assistant", "content": "a"}]},
            {"input": {"messages": "not a list"}, "preferred_output": "a", "non_preferred_output": "b"}]
    path = _write(tmp_path / "bad.jsonl", rows)
    _, ok, bad = _convert(path)
    assert len(ok) == 1 and len(bad) == 3
    assert bad[0].startswith(f"{path}:2: rejected: the same text as the chosen reply")
    assert bad[1].startswith(f"{path}:3: non_preferred_output: must be a string or an assistant message")
    assert bad[2].startswith(f"{path}:4: input.messages: must be a list")


def test_implicit_pair_with_different_prompts_is_refused(tmp_path):
    row = {"chosen": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "a"}],
           "rejected": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "b"}]}
    _, ok, bad = _convert(_write(tmp_path / "i.jsonl", [row]))
    assert not ok and "rejected[0]: chosen and rejected differ before their last reply" in bad[0]


def test_llamafactory_preference_demos_convert():
    dpo, kto = thirdparty.path("llamafactory-dpo"), thirdparty.path("llamafactory-kto")
    if not dpo.exists() and not os.environ.get("FTKIT_REQUIRE_THIRDPARTY"):
        pytest.skip("make thirdparty fetches LLaMA-Factory's demo files")
    det, ok, bad = _convert(str(dpo))
    assert det.format == "preference" and len(ok) == 300 and not bad
    det, ok, bad = _convert(str(kto), "kto")  # OpenAI messages plus a label: KTO when asked for
    assert len(ok) == 300 and not bad and {r["label"] for r in ok} == {True, False}


def _prepare(tmp_path, rows, **data):
    import ftkit
    from ftkit.core.config import load_config

    path = _write(tmp_path / "prefs.jsonl", rows)
    cfg = load_config(experiment="p", outputs_dir=str(tmp_path / "out"), model={"name": "tiny-random"},
                      data={"path": path, **data})
    paths = ftkit.run_paths(cfg)
    return cfg, paths, ftkit.data.run(cfg, paths)


def test_splits_keep_a_prompts_pairs_together_and_count_every_record(tmp_path):
    from ftkit.core.files import read_jsonl

    rows = [{"prompt": f"question {i}", "chosen": f"good answer {i} variant {k}", "rejected": f"bad answer {i} v{k}"}
            for i in range(60) for k in range(3)]
    rows.append({"prompt": "q", "chosen": "same", "rejected": "same"})
    cfg, paths, result = _prepare(tmp_path, rows, near_duplicate_threshold=None)
    where = {}
    for split in ("train", "val", "test"):
        for r in read_jsonl(paths.split(split)):
            where.setdefault(r["messages"][0]["content"], set()).add(split)
    assert all(len(s) == 1 for s in where.values()) and len(where) == 60
    m = result.metrics
    assert m["rows_in"] == len(rows) and m["rows_kept"] + m["rows_quarantined"] == len(rows)
    assert m["quarantine_reasons"] == {"same_reply": 1}


def test_pairs_are_cut_at_the_last_reply_with_the_end_of_turn_trained(tmp_path):
    import ftkit
    from ftkit.core.files import read_jsonl
    from ftkit.core.masking import end_of_turn_token_id

    rows = SAMPLES["openai_dpo"] * 1 + [
        {"input": {"messages": [{"role": "user", "content": f"Ticket {i}: my parcel is late"}]},
         "preferred_output": [{"role": "assistant", "content": f"Sorry, parcel {i} ships today."}],
         "non_preferred_output": [{"role": "assistant", "content": f"Parcel {i}? Wait."}]} for i in range(40)]
    cfg, paths, _ = _prepare(tmp_path, rows)
    converted = ftkit.convert.run(cfg, paths)
    tok = converted.tokenizer
    eot = end_of_turn_token_id(tok)
    row = read_jsonl(paths.tokens("train"))[0]
    chat = read_jsonl(paths.chat("train"))[0]
    assert row["input_ids"][:len(row["prompt_ids"]) + len(row["chosen_ids"])] == row["prompt_ids"] + row["chosen_ids"]
    assert row["chosen_ids"][-1] == eot and row["rejected_ids"][-1] == eot
    assert tok.decode(row["chosen_ids"][:-1]).strip() == chat["messages"][-1]["content"]
    assert tok.decode(row["rejected_ids"][:-1]).strip() == chat["rejected"]["content"]
    # the prompt is what serving sends: the template's generation prompt
    from ftkit.core.masking import encode_prompt

    assert row["prompt_ids"] == encode_prompt(tok, chat["messages"][:-1])
    pref = converted.metrics["preference"]["train"]
    assert pref["pairs"] == converted.metrics["kept"]["train"] and pref["length_ratio_mean"] > 1


def test_a_pair_is_sized_as_the_two_sequences_a_step_puts_through_the_model():
    """The pre-flight and the micro-batch fold size a pair as TRL batches it (chosen and rejected side by
    side, each padded to the longer) and time DPO/KTO's reference forward, ORPO's not."""
    from ftkit.core.preference import reference_time_factor, step_tokens

    assert step_tokens({"prompt_ids": [1] * 10, "chosen_ids": [2] * 5, "rejected_ids": [3] * 8}) == 2 * (10 + 8)
    assert step_tokens({"prompt_ids": [1] * 10, "completion_ids": [2] * 5, "label": True}) == 15
    assert step_tokens({"input_ids": [1] * 7, "labels": [1] * 7}) == 7
    assert reference_time_factor("dpo") == reference_time_factor("kto") == 4 / 3
    assert reference_time_factor("orpo") == reference_time_factor("instruction") == 1.0


def _tiny_dpo(tmp_path, objective="dpo", beta=0.1):
    import torch

    from ftkit.core.config import load_config
    from ftkit.core.modeling import load_model, load_tokenizer, resolve_model_path
    from ftkit.core.paths import RunPaths
    from ftkit.train.loading import add_lora
    from ftkit.train.plan import device_plan
    from ftkit.train.preference import build_preference_trainer

    torch.manual_seed(0)
    from conftest import EXACT_MODEL  # the losses are checked against hand-computed ones to 1e-4

    cfg = load_config(experiment="d", outputs_dir=str(tmp_path), model=EXACT_MODEL,
                      train={"objective": objective, "batch_size": 2, "max_steps": 2, "eval_steps": 0,
                             "preference": {"beta": beta}})
    path = resolve_model_path("tiny-random")
    tok, model = load_tokenizer(path), add_lora(load_model(path, cfg.model), cfg)
    rows = [{"prompt_ids": [1, 5, 9, 11], "chosen_ids": [20, 21, 22], "rejected_ids": [30, 31]},
            {"prompt_ids": [1, 7], "chosen_ids": [40, 41], "rejected_ids": [50, 51, 52, 53]}]
    trainer = build_preference_trainer(cfg, RunPaths(tmp_path, "d"), model, tok, rows, [], device_plan(cfg))
    return trainer, model, rows


def _logp(model, prompt, reply):
    import torch

    ids = torch.tensor([prompt + reply])
    logits = model(input_ids=ids).logits.float().log_softmax(-1)[0]
    return float(sum(logits[len(prompt) - 1 + k, t] for k, t in enumerate(reply)))


def test_dpo_loss_matches_a_hand_computation_and_the_reference_is_the_adapter_off_model(tmp_path):
    import torch

    beta = 1.0
    trainer, model, rows = _tiny_dpo(tmp_path, beta=beta)
    with torch.no_grad():  # move the policy away from its initial (reference) adapter
        for name, p in model.named_parameters():
            if "lora_B.default" in name:
                p.normal_(0, 4.0)
    batch = trainer.data_collator(rows)
    model.eval()
    with torch.no_grad():
        loss = float(trainer.compute_loss(model, batch))
        with model.disable_adapter():
            ref = [(_logp(model, r["prompt_ids"], r["chosen_ids"]), _logp(model, r["prompt_ids"], r["rejected_ids"]))
                   for r in rows]
        pol = [(_logp(model, r["prompt_ids"], r["chosen_ids"]), _logp(model, r["prompt_ids"], r["rejected_ids"]))
               for r in rows]
        trl_ref = trainer.compute_ref_log_probs(model, batch)
    by_hand = [-math.log(1 / (1 + math.exp(-beta * ((pc - rc) - (pr - rr))))) for (pc, pr), (rc, rr) in zip(pol, ref, strict=True)]
    assert loss == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-4, abs=1e-5)
    assert abs(pol[0][0] - ref[0][0]) > 0.01 and abs(sum(by_hand) / 2 - math.log(2)) > 1e-3  # it did move
    # TRL's reference (a frozen copy of the adapter as it started) equals the adapter-off model
    ref_chosen, ref_rejected = (t.tolist() for t in trl_ref)
    assert ref_chosen == pytest.approx([c for c, _ in ref], abs=1e-4)
    assert ref_rejected == pytest.approx([r for _, r in ref], abs=1e-4)


def test_orpo_loss_is_the_replys_language_model_loss_plus_the_odds_ratio_term(tmp_path):
    """ORPO (reference-free): the chosen reply's mean negative log-likelihood (prompt tokens not trained) minus
    beta x log sigmoid(log odds(chosen) - log odds(rejected)), odds from each reply's mean token probability."""
    import torch

    beta = 0.5
    trainer, model, rows = _tiny_dpo(tmp_path, objective="orpo", beta=beta)
    assert not hasattr(trainer, "ref_model") or trainer.ref_model is None
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.default" in name:
                p.normal_(0, 4.0)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    model.eval()
    with torch.no_grad():
        loss = float(trainer.compute_loss(model, batch))
        sums = [(_logp(model, r["prompt_ids"], r["chosen_ids"]), _logp(model, r["prompt_ids"], r["rejected_ids"]))
                for r in rows]
    nll = -sum(c for c, _ in sums) / sum(len(r["chosen_ids"]) for r in rows)
    terms = []
    for (c, rj), r in zip(sums, rows, strict=True):
        mc, mr = c / len(r["chosen_ids"]), rj / len(r["rejected_ids"])
        log_odds = (mc - mr) - (math.log1p(-math.exp(mc)) - math.log1p(-math.exp(mr)))
        terms.append(-math.log1p(math.exp(-log_odds)))  # log sigmoid
    assert loss == pytest.approx(nll - beta * sum(terms) / len(terms), rel=1e-4, abs=1e-5)


def test_full_dpo_takes_its_reference_from_the_starting_weights_without_a_copy(tmp_path):
    """method: full under DPO: no reference model is kept; the reference log-probabilities TRL computed before
    the first step are the starting model's; training moves the weights."""
    import torch

    import ftkit
    from ftkit.core.config import load_config

    rows = [{"prompt": f"Where is parcel {i}?", "chosen": f"Parcel {i} ships today.", "rejected": "No idea."}
            for i in range(16)]
    _prepare(tmp_path, rows)
    cfg = load_config(experiment="p", outputs_dir=str(tmp_path / "out"), model={"name": "tiny-random"},
                      data={"path": str(tmp_path / "prefs.jsonl")},
                      train={"objective": "dpo", "method": "full", "max_steps": 2, "batch_size": 4, "eval_steps": 0,
                             "learning_rate": 1e-3})
    paths = ftkit.run_paths(cfg)
    ftkit.convert.run(cfg, paths)
    from ftkit.core.modeling import load_model, load_tokenizer, resolve_model_path
    from ftkit.train.plan import device_plan
    from ftkit.train.preference import build_preference_trainer
    from ftkit.train.trainer import load_tokens

    path = resolve_model_path("tiny-random")
    model, tok = load_model(path, cfg.model), load_tokenizer(path)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    train_rows = load_tokens(paths.tokens("train"), objective="dpo")
    trainer = build_preference_trainer(cfg, paths, model, tok, train_rows, [], device_plan(cfg))
    assert trainer.ref_model is None and trainer.precompute_ref_logps
    first = trainer.train_dataset[0]
    model.eval()
    with torch.no_grad():
        assert first["ref_chosen_logps"] == pytest.approx(_logp(model, first["prompt_ids"], first["chosen_ids"]), abs=1e-4)
        assert first["ref_rejected_logps"] == pytest.approx(
            _logp(model, first["prompt_ids"], first["rejected_ids"]), abs=1e-4)
    trainer.train()
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in start.items())


def test_kto_trains_on_unpaired_labels(tmp_path):
    import ftkit

    rows = [{"prompt": f"Where is parcel {i}?", "completion": f"Parcel {i} ships today." if i % 2 else "No.",
             "label": bool(i % 2)} for i in range(48)]
    cfg, paths, _ = _prepare(tmp_path, rows)
    from ftkit.core.config import load_config

    cfg = load_config(experiment="p", outputs_dir=str(tmp_path / "out"), model={"name": "tiny-random"},
                      data={"path": str(tmp_path / "prefs.jsonl")},
                      train={"objective": "kto", "max_steps": 4, "batch_size": 4, "eval_steps": 0,
                             "learning_rate": 1e-3})
    ftkit.convert.run(cfg, paths)
    metrics = ftkit.train.run(cfg, paths).metrics
    assert metrics["steps"] == 4 and math.isfinite(metrics["train_loss"])
    from safetensors.torch import load_file

    weights = load_file(str(paths.adapter_dir / "adapter_model.safetensors"))
    assert any(float(v.abs().sum()) > 0 for k, v in weights.items() if "lora_B" in k)  # the adapter moved


def test_sft_then_dpo_through_the_stages_answers_did_it_help(tmp_path):
    """Preference pairs through stages 01-04 on the tiny model: SFT on the chosen replies, then DPO from that
    adapter; stage 04 compares the DPO model with the SFT model it started from and ranks the held-out pairs."""
    import ftkit
    from ftkit.core.config import load_config

    rows = [{"input": {"messages": [{"role": "user", "content": f"Where is my order AC-{100000 + i}?"}]},
             "preferred_output": [{"role": "assistant", "content": f"Order AC-{100000 + i} ships today.\n— Support"}],
             "non_preferred_output": [{"role": "assistant", "content": "Your order ships today."}]} for i in range(60)]
    data = _write(tmp_path / "pairs.jsonl", rows)
    common = dict(outputs_dir=str(tmp_path / "out"), model={"name": "tiny-random"}, data={"path": data},
                  evaluate={"num_generations": 4, "max_new_tokens": 8, "bootstrap_samples": 200,
                            "rules": {"required_phrases": ["— Support"]}})
    sft = load_config(experiment="sft", train={"max_steps": 3, "batch_size": 4, "eval_steps": 0}, **common)
    paths = ftkit.run_paths(sft)
    for stage in (ftkit.data, ftkit.convert, ftkit.train):
        stage.run(sft, paths)
    dpo = load_config(experiment="dpo", train={"objective": "dpo", "init_adapter": "experiment:sft", "max_steps": 3,
                                               "batch_size": 4, "eval_steps": 0, "learning_rate": 1e-3}, **common)
    dpaths = ftkit.run_paths(dpo)
    for stage in (ftkit.data, ftkit.convert, ftkit.train):
        stage.run(dpo, dpaths)
    m = ftkit.evaluate.run(dpo, dpaths).metrics
    assert {"base", "prompted", "sft", "tuned"} <= set(m) and "rule_pass_rate" in m["deltas"]["tuned_vs_sft"]
    assert any(v.startswith("Preference tuning") for v in m["verdict"])
    p = m["preference"]
    assert p["pairs"] == len([1 for _ in open(dpaths.tokens("test"))]) > 0
    assert p["reference"].startswith("the adapter training started from")
    assert 0 <= p["accuracy"]["value"] <= 1 and p["margin"]["ci_low"] <= p["margin"]["value"] <= p["margin"]["ci_high"]
    assert p["margin"]["value"] != 0  # DPO moved the policy away from its reference


def test_full_orpo_through_the_stages_ranks_the_held_out_pairs_against_the_base(tmp_path):
    """ORPO with every weight trained, stages 01-04 on the tiny model: no reference in training; stage 04 ranks
    the held-out pairs with the base model as the reference, and says so."""
    import ftkit
    from ftkit.core.config import load_config

    rows = [{"prompt": f"Where is parcel {i}?", "chosen": f"Parcel {i} ships today.", "rejected": "No idea."}
            for i in range(40)]
    data = _write(tmp_path / "pairs.jsonl", rows)
    cfg = load_config(experiment="orpo", outputs_dir=str(tmp_path / "out"), model={"name": "tiny-random"},
                      data={"path": data}, evaluate={"num_generations": 2, "max_new_tokens": 4, "bootstrap_samples": 100},
                      train={"objective": "orpo", "method": "full", "max_steps": 3, "batch_size": 4, "eval_steps": 0,
                             "learning_rate": 1e-3})
    paths = ftkit.run_paths(cfg)
    for stage in (ftkit.data, ftkit.convert):
        stage.run(cfg, paths)
    trained = ftkit.train.run(cfg, paths).metrics
    assert trained["objective"] == "orpo" and trained["method"] == "full" and math.isfinite(trained["train_loss"])
    m = ftkit.evaluate.run(cfg, paths).metrics
    p = m["preference"]
    assert p["reference"] == "the base model" and p["pairs"] > 0
    assert p["margin"]["value"] != 0  # the tuned weights differ from the base's


def test_a_dpo_run_resumes_where_it_stopped(tmp_path):
    """Three steps, then a second run to six resumes from the checkpoint (not from scratch) and ends where
    an uninterrupted six-step run ends (constant learning rate: the schedule does not depend on max_steps)."""
    import shutil

    import ftkit
    from ftkit.core.config import load_config

    rows = [{"prompt": f"Where is parcel {i}?", "chosen": f"Parcel {i} ships today.", "rejected": "No idea."}
            for i in range(40)]
    _prepare(tmp_path, rows)
    base = dict(model={"name": "tiny-random"}, data={"path": str(tmp_path / "prefs.jsonl")})
    train = {"objective": "dpo", "batch_size": 4, "eval_steps": 0, "learning_rate": 1e-3, "save_steps": 3,
             "lr_scheduler": "constant", "warmup_ratio": 0.0, "logging_steps": 1}
    runs = {}
    for name in ("whole", "split"):
        cfg = load_config(experiment="p", outputs_dir=str(tmp_path / name), train={**train, "max_steps": 6}, **base)
        shutil.copytree(tmp_path / "out" / "p", tmp_path / name / "p")
        ftkit.convert.run(cfg, ftkit.run_paths(cfg))
        runs[name] = cfg
    first = load_config(experiment="p", outputs_dir=str(tmp_path / "split"), train={**train, "max_steps": 3}, **base)
    assert ftkit.train.run(first, ftkit.run_paths(first)).metrics["steps"] == 3
    resumed = ftkit.train.run(runs["split"], ftkit.run_paths(runs["split"])).metrics
    whole = ftkit.train.run(runs["whole"], ftkit.run_paths(runs["whole"])).metrics
    assert resumed["resumed_from"].endswith("checkpoint-3") and resumed["steps_this_run"] == 3
    assert resumed["train_loss_last"] == pytest.approx(whole["train_loss_last"], abs=1e-4)


@pytest.mark.parametrize("method", ["qlora", "dora"])
def test_dpo_trains_with_each_adapter_method(tmp_path, method):
    """QLoRA (4-bit base) and DoRA under DPO: the run ends, its loss is finite and the adapter moved."""
    import ftkit
    from ftkit.core.config import load_config

    rows = [{"prompt": f"Where is parcel {i}?", "chosen": f"Parcel {i} ships today.", "rejected": "No idea."}
            for i in range(24)]
    _prepare(tmp_path, rows)
    cfg = load_config(experiment="p", outputs_dir=str(tmp_path / "out"), model={"name": "tiny-random"},
                      data={"path": str(tmp_path / "prefs.jsonl")},
                      train={"objective": "dpo", "method": method, "max_steps": 2, "batch_size": 4, "eval_steps": 0,
                             "learning_rate": 1e-3})
    paths = ftkit.run_paths(cfg)
    ftkit.convert.run(cfg, paths)
    metrics = ftkit.train.run(cfg, paths).metrics
    assert metrics["steps"] == 2 and math.isfinite(metrics["train_loss"]) and metrics["method"] == method
    from safetensors.torch import load_file

    weights = load_file(str(paths.adapter_dir / "adapter_model.safetensors"))
    assert any(float(v.abs().sum()) > 0 for k, v in weights.items() if "lora_B" in k)
