"""Stage 05 logic: the train/serve consistency check against live servers, the load generator, cost."""

import math
import shutil

import pytest

import ftkit
from ftkit.core.config import HostConfig
from ftkit.core.files import write_jsonl
from ftkit.core.masking import build_example
from ftkit.core.modeling import load_tokenizer
from ftkit.host import client as host
from ftkit.host import consistency, cost, loadtest, widget
from ftkit.host.server_process import ServerProcess

CONVERSATIONS = [
    [{"role": "system", "content": "You are AcmeCorp support."}, {"role": "user", "content": "Where is AC-123456?"},
     {"role": "assistant", "content": "It ships today.\n— AcmeCorp Support"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Reset my password"}, {"role": "assistant", "content": "Use the link."}],
]


@pytest.fixture(scope="module")
def run(tiny_path, tmp_path_factory):
    """A stage-02 hand-off (test chats + their training tokens) for the tiny model."""
    out = tmp_path_factory.mktemp("outputs")
    cfg = ftkit.load_config(experiment="t", outputs_dir=str(out), model={"name": "tiny-random"},
                            host={"min_stop_rate": 0.0, "consistency_max_tokens": 8, "load_concurrency": [1, 4],
                                  "load_requests_per_client": 1, "load_max_tokens": 8})
    paths = ftkit.run_paths(cfg)
    tok = load_tokenizer(tiny_path)
    write_jsonl(paths.chat("test"), [{"id": f"c{i}", "messages": m} for i, m in enumerate(CONVERSATIONS)])
    write_jsonl(paths.tokens("test"), [{"id": f"c{i}", **build_example(tok, m).to_dict()}
                                       for i, m in enumerate(CONVERSATIONS)])
    return cfg, paths


def test_consistency_passes_on_the_served_model(run, tiny_path, tmp_path):
    cfg, paths = run
    with ServerProcess(tiny_path, log_path=tmp_path / "s.log") as srv:
        check = consistency.consistency_check(srv, cfg, paths)
    assert check["consistency_cases"] == 3  # one + two assistant turns
    assert check["consistency_prompts_match"] and check["consistency_no_run_on"] and check["consistency_passed"]
    assert "3/3 prompts equal their training tokens" in check["consistency_reason"]


def test_consistency_catches_a_template_that_drifted(run, tiny_path, tmp_path):
    """A server whose chat template differs by one newline from training's fails, and says where."""
    cfg, paths = run
    drifted = tmp_path / "drifted"
    shutil.copytree(tiny_path, drifted)
    tok = load_tokenizer(str(drifted))
    tok.chat_template = tok.chat_template.replace("message['role'] + '\n'", "message['role'] + ':\n'")
    assert tok.chat_template != load_tokenizer(tiny_path).chat_template
    tok.save_pretrained(drifted)
    with ServerProcess(drifted, log_path=tmp_path / "s.log") as srv:
        check = consistency.consistency_check(srv, cfg, paths)
    assert not check["consistency_prompts_match"] and not check["consistency_passed"]
    assert "0/3 prompts equal their training tokens (first difference: c" in check["consistency_reason"]
    assert all(r["first_difference_at"] is not None for r in check["consistency_rows"])


def test_consistency_requires_replies_that_stop(run, tiny_path, tmp_path):
    """The random model never emits end-of-turn in 8 tokens: with min_stop_rate 1 the check fails."""
    cfg, paths = run
    strict = ftkit.load_config(cfg.to_dict() | {"host": {**cfg.to_dict()["host"], "min_stop_rate": 1.0}})
    with ServerProcess(tiny_path, log_path=tmp_path / "s.log") as srv:
        check = consistency.consistency_check(srv, strict, paths)
        levels = loadtest.measure(srv, cfg, host.check_prompts(paths, n=2))
    assert check["consistency_prompts_match"] and not check["consistency_passed"]
    assert "0% of replies end with the end-of-turn token" in check["consistency_reason"]
    assert [lv["concurrency"] for lv in levels] == [1, 4] and [lv["requests"] for lv in levels] == [1, 4]
    for lv in levels:
        assert 0 < lv["completion_tokens"] <= 8 * lv["requests"]
        assert 0 < lv["ttft_median_s"] <= lv["wall_s"] and lv["tokens_per_s_total"] > 0


def test_chat_box_streams_a_reply(tiny_path, tmp_path):
    cfg = ftkit.load_config(model={"name": "tiny-random"}, convert={"system_prompt": "Be brief."},
                            evaluate={"max_new_tokens": 6})
    with ServerProcess(tiny_path, log_path=tmp_path / "s.log") as srv:
        chat = widget.chat_box(srv, cfg)
        text, send = chat.children[0].children
        text.value = "Where is AC-123456?"
        send.click()
    assert text.value == ""
    assert [m["role"] for m in chat.history] == ["system", "user", "assistant"]
    assert chat.history[1]["content"] == "Where is AC-123456?" and chat.history[2]["content"]


def test_monthly_costs_and_payback():
    h = HostConfig(requests_per_day=10_000, tokens_per_request=600, hosted_price_per_million_tokens=1.5,
                   machine_hourly_usd=0.10, fine_tune_cost_usd=20.0)
    c = cost.monthly_costs(h, requests_per_second=0.05)
    assert c["tokens_per_month"] == pytest.approx(182_400_000)  # the hosted price: prompt + reply tokens
    assert c["hosted_monthly_usd"] == pytest.approx(273.6)
    assert c["needed_requests_per_s"] == pytest.approx(0.11574, abs=1e-5) and c["machines"] == 3  # 0.116 / 0.05 → 3
    assert c["self_hosted_monthly_usd"] == pytest.approx(219.0)
    assert c["payback_months"] == pytest.approx(20.0 / (273.6 - 219.0))
    dear = cost.monthly_costs(HostConfig(machine_hourly_usd=5.0), requests_per_second=0.05)
    assert dear["monthly_saving_usd"] < 0 and math.isinf(dear["payback_months"])
    curve = cost.cumulative(c, months=2)
    assert curve[0] == {"month": 0, "hosted API": 0.0, "fine-tuned, self-hosted": 20.0}


def test_machines_are_sized_on_measured_requests_not_prompt_plus_reply_tokens():
    """A load test of 32 requests of 64 reply tokens in 40 s measured 51.2 reply tokens/s, 0.8 requests/s.
    10,000 requests a day of 600 prompt + reply tokens need 0.116 requests/s: one machine. (Dividing
    600-token requests by 51.2 reply tokens/s gave 69.4 / 51.2 → 2 machines, counting each prompt as
    reply tokens to generate.)"""
    load = [{"concurrency": 1, "requests": 2, "completion_tokens": 128, "wall_s": 9.0, "requests_per_s": 2 / 9.0,
             "tokens_per_s_total": 128 / 9.0},
            {"concurrency": 16, "requests": 32, "completion_tokens": 2048, "wall_s": 40.0, "requests_per_s": 0.8,
             "tokens_per_s_total": 51.2}]
    measured = cost.capacity(load)
    assert measured == {"requests_per_second": 0.8, "reply_tokens_per_request": 64.0}
    c = cost.monthly_costs(HostConfig(requests_per_day=10_000, tokens_per_request=600), **measured)
    assert c["machines"] == 1 and c["measured_reply_tokens_per_request"] == 64.0
    assert cost.monthly_costs(HostConfig(requests_per_day=200_000), **measured)["machines"] == 3  # 2.31 / 0.8
    assert cost.monthly_costs(HostConfig(requests_per_day=69_120), **measured)["machines"] == 1  # exactly 0.8/s


def test_serving_commands(run):
    cfg, paths = run
    cmds = host.serving_commands(cfg, paths, {"gguf": [{"type": "q8_0", "path": "/x/t-q8_0.gguf"}],
                                              "modelfile": "/x/Modelfile"})
    assert cmds["vLLM, merged model"].startswith(f"vllm serve {paths.merged_dir} --served-model-name t")
    assert cmds["llama.cpp server, q8_0"].startswith("llama-server -m /x/t-q8_0.gguf --jinja")
    assert "ollama create t -f Modelfile" in cmds["Ollama"]


def test_qlora_adapter_merges_into_the_full_precision_base(tiny_path, tmp_path):
    """A QLoRA run's adapter is merged into the base loaded unquantised (not into de-quantised 4-bit
    weights): no 4-bit layer in the merged model, logits equal base + adapter, and the saved directory
    stops on the end-of-turn token with the training chat template."""
    import json

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ftkit.host.merge import merge_adapter

    cfg = ftkit.load_config(experiment="q", outputs_dir=str(tmp_path), model={"name": "tiny-random"},
                            train={"method": "qlora"})
    paths = ftkit.run_paths(cfg)
    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_path),
                                LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    peft_model.save_pretrained(paths.adapter_dir)
    load_tokenizer(tiny_path).save_pretrained(paths.adapter_dir)
    (paths.adapter_dir / "ftkit_train.json").write_text(json.dumps({"base_model": "tiny-random", "method": "qlora"}))
    merged = merge_adapter(cfg, paths, [m[:-1] for m in CONVERSATIONS])
    assert merged["method"] == "qlora" and merged["merged_dtype"] == "float32"
    assert merged["merge_check_passed"] and merged["max_logit_diff_adapter_vs_base"] > 100 * merged[
        "max_logit_diff_merged_vs_adapter"]
    assert merged["saved_eos_includes_end_of_turn"] and merged["saved_chat_template_matches"]
    reloaded = AutoModelForCausalLM.from_pretrained(paths.merged_dir)
    assert not [n for n, m in reloaded.named_modules() if "4bit" in type(m).__name__]
