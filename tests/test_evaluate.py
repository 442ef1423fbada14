import pytest
import torch

from ftkit.core.config import RulesConfig
from ftkit.core.generation import generate
from ftkit.evaluate.loss import heldout_loss
from ftkit.evaluate.metrics import rouge_l
from ftkit.evaluate.rules import check_rules, count_sentences


@pytest.mark.parametrize("text,n", [("", 0), ("One.", 1), ("One. Two! Three?", 3), ("No end", 1),
                                    ("Order AC-1.5 is fine. Next step", 2), ("Wait... what?", 2)])
def test_count_sentences(text, n):
    assert count_sentences(text) == n


def test_check_rules():
    rules = RulesConfig(max_sentences=2, required_phrases=["— Acme"], ignore_for_sentences=["— Acme"],
                        echo_pattern=r"AC-\d{6}", must_not_match=[r"(?i)as an ai"])
    ok = check_rules("Order AC-123456 ships. Track it online.\n— Acme", "where is AC-123456?", rules)
    assert ok.passed and ok.failures == []
    bad = check_rules("As an AI I can't. Sorry. Really.", "where is AC-123456?", rules)
    assert not bad.passed
    assert bad.failures == ["more than 2 sentences (3)", "missing required phrase '— Acme'",
                            "matches forbidden /(?i)as an ai/", "does not repeat 'AC-123456' from the prompt"]


def test_rouge_l_known_values():
    assert rouge_l(["the cat sat"], ["the cat sat"]) == [1.0]
    assert rouge_l(["dog"], ["the cat sat"]) == [0.0]
    # LCS "the sat" = 2 of 3 and 2 of 3 -> F = 2/3
    assert rouge_l(["the dog sat"], ["the cat sat"])[0] == pytest.approx(2 / 3)


def test_heldout_loss_matches_model_loss(tiny_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from ftkit.core.masking import build_example

    model = AutoModelForCausalLM.from_pretrained(tiny_path).eval()
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello, how can I help?"}]
    ex = build_example(tokenizer, msgs).to_dict()
    short = build_example(tokenizer, msgs[:1] + [{"role": "assistant", "content": "Hi"}]).to_dict()
    with torch.no_grad():
        ref = [model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]])).loss.item()
               for e in (ex, short)]
    n = [sum(1 for x in e["labels"] if x != -100) - 0 for e in (ex, short)]
    expected = (ref[0] * n[0] + ref[1] * n[1]) / (n[0] + n[1])  # per-token mean over both, padding ignored
    got = heldout_loss(model, [ex, short], tokenizer.pad_token_id, batch_size=2)
    assert got["tokens"] == sum(n)
    assert got["loss"] == pytest.approx(expected, rel=1e-4)


def test_example_losses_do_not_depend_on_batching(tiny_path, tokenizer):
    """Per-example losses come back in input order, the same whatever the batch size or token budget."""
    from transformers import AutoModelForCausalLM

    from ftkit.core.masking import build_example
    from ftkit.evaluate.loss import example_losses

    model = AutoModelForCausalLM.from_pretrained(tiny_path).eval()
    rows = [build_example(tokenizer, [{"role": "user", "content": "q" * (i % 7 + 1)},
                                      {"role": "assistant", "content": "answer " * (i % 5 + 1)}]).to_dict()
            for i in range(19)]
    one = example_losses(model, iter(rows), tokenizer.pad_token_id, batch_size=1)
    many = example_losses(model, iter(rows), tokenizer.pad_token_id, batch_size=8)
    tight = example_losses(model, iter(rows), tokenizer.pad_token_id, batch_size=8, max_batch_tokens=40)
    assert one[1] == many[1] == tight[1] == [sum(x != -100 for x in r["labels"][1:]) for r in rows]
    assert many[0] == pytest.approx(one[0], rel=1e-4) and tight[0] == pytest.approx(one[0], rel=1e-4)


def test_prompted_losses_from_a_cached_prefix_equal_whole_rows(tiny_path, tokenizer):
    """The prompted rows share their system prompt and few-shot turns; scoring them on one cached
    forward of that prefix gives the losses of reading every row whole (also with adapters on)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ftkit.evaluate.loss import _prefix_cache, _prefix_groups, example_losses
    from ftkit.evaluate.prompting import Prompting, prompted_row

    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    shots = [{"role": "user", "content": "Where is AC-111111?"}, {"role": "assistant", "content": "Shipped today."},
             {"role": "user", "content": "Can I return shoes?"}, {"role": "assistant", "content": "Yes, within 30 days."}]
    prompting = Prompting("Answer briefly and sign as Acme.", shots, ["s1", "s2"])
    rows = [prompted_row(tokenizer, [{"role": "user", "content": "question " * (i % 6 + 1)},
                                     {"role": "assistant", "content": "reply " * (i % 4 + 1)}], prompting)
            for i in range(11)]
    plain, shared = _prefix_groups(rows)
    assert plain == [] and len(shared) == 1 and len(next(iter(shared.values()))) == 11  # one shared prefix
    assert _prefix_cache(model, next(iter(shared)), "cpu") is not None  # the cached path is the one taken
    whole = [{k: r[k] for k in ("input_ids", "labels")} for r in rows]  # no prefix_len: read whole
    ref = example_losses(model, iter(whole), tokenizer.pad_token_id, batch_size=4)
    got = example_losses(model, iter(rows), tokenizer.pad_token_id, batch_size=4)
    assert got[1] == ref[1] and all(n > 0 for n in got[1])
    assert got[0] == pytest.approx(ref[0], rel=1e-4)


def test_stop_detection(tiny_path, tokenizer):
    """A model that never emits a stop token is flagged; one whose first token is a stop token stops."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_path).eval()
    prompts = [[{"role": "user", "content": "Hello"}], [{"role": "user", "content": "Where is my parcel?"}]]
    never = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=2, stop_ids=[-1])
    assert [(g["stopped"], g["new_tokens"]) for g in never] == [(False, 6), (False, 6)]
    first_id = never[0]["token_ids"][0]
    stopped = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=2, stop_ids=[first_id])
    assert stopped[0]["stopped"] and stopped[0]["new_tokens"] == 0 and stopped[0]["text"] == ""


# ----------------------------------------------------------------------------- metrics, hand-computed

def test_exact_match_and_token_f1():
    from ftkit.evaluate.metrics import exact_match, normalize_answer, token_f1

    assert normalize_answer("  The  Cat, sat!  ") == "cat sat"
    assert exact_match("The cat sat.", "cat sat") == 1.0
    assert exact_match("cat sat down", "cat sat") == 0.0
    # "cat sat on mat" vs "cat sat": 2 common tokens, precision 2/4, recall 2/2 -> F1 = 2/3
    assert token_f1("The cat sat on the mat", "a cat sat") == pytest.approx(2 / 3)
    # repeated tokens count once per occurrence: "no no no" vs "no": P 1/3, R 1 -> 1/2
    assert token_f1("no no no", "no") == pytest.approx(0.5)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("", "cat") == 0.0


def test_chrf_bleu_bounds_and_order():
    from ftkit.evaluate.metrics import bleu, chrf

    ref = "Your order ships tomorrow from our warehouse."
    assert chrf(ref, ref) == pytest.approx(1.0) and bleu(ref, ref) == pytest.approx(1.0)
    assert chrf("xyz", "abc") == 0.0
    near, far = "Your order ships tomorrow from the warehouse.", "We are closed on Sunday."
    assert 0 < chrf(far, ref) < chrf(near, ref) < 1
    assert bleu(far, ref) < bleu(near, ref) < 1


def test_json_validity_and_task_inference():
    from ftkit.evaluate.metrics import infer_task, json_valid

    assert json_valid('{"a": 1}') and json_valid('```json\n{"a": [1, 2]}\n```') and json_valid("[1]")
    assert not json_valid('{"a": 1') and not json_valid("yes")
    assert infer_task(['{"intent": "refund"}', '{"intent": "track"}']) == "json"
    assert infer_task(["refund", "track", "refund", "cancel", "track", "refund"]) == "label"
    assert infer_task(["Your parcel left our depot today and should arrive tomorrow.", "Sure, here is how."]) == \
        "free_text"


def test_label_metrics_hand_computed():
    from ftkit.evaluate.metrics import label_metrics

    got = label_metrics(["a", "b", "a", "c"], ["a", "b", "b", "a"])
    assert got["accuracy"] == 0.5
    # label a: TP 1, FP 1, FN 1 -> F1 0.5; label b: TP 1, FP 0, FN 1 -> F1 2/3; macro = 7/12
    assert got["macro_f1"] == pytest.approx(7 / 12)
    assert got["labels"] == ["a", "b", "(other)"]
    assert got["confusion_matrix"] == [[1, 0, 1], [1, 1, 0], [0, 0, 0]]


def test_bootstrap_known_cases():
    import numpy as np

    from ftkit.evaluate.metrics import Sample, bootstrap_ci, paired_bootstrap

    rng = np.random.default_rng(1)
    a = rng.normal(size=200)
    # a constant shift: the paired difference is exactly that shift in every resample
    d = paired_bootstrap(Sample.of(a), Sample.of(a + 0.25))
    assert d["delta"] == pytest.approx(0.25) and d["ci_low"] == pytest.approx(0.25) and d["ci_high"] == pytest.approx(0.25)
    # a fair coin over 400 draws: the 95% interval of the mean is about 0.5 +- 1.96 * sqrt(0.25 / 400) = +-0.049
    coin = Sample.of([0, 1] * 200)
    ci = bootstrap_ci(coin, resamples=4000, seed=3)
    assert ci["value"] == 0.5
    assert ci["ci_low"] == pytest.approx(0.451, abs=0.012) and ci["ci_high"] == pytest.approx(0.549, abs=0.012)
    # a ratio statistic: summed losses over summed tokens, not a mean of per-example means
    loss = Sample.of([10.0, 1.0], weights=[10, 1])
    assert loss.point() == pytest.approx(1.0)
    # same seed, same interval
    assert bootstrap_ci(coin, seed=7) == bootstrap_ci(coin, seed=7)
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap(Sample.of([1, 2]), Sample.of([1]))


# ----------------------------------------------------------------------------- judge

class _Positional:
    """A judge with pure position bias: always answers A."""

    def choose(self, prompt, reference, a, b):
        return "A"


class _PrefersLonger:
    def choose(self, prompt, reference, a, b):
        return "A" if len(a) > len(b) else "B"


def test_judge_order_swap_cancels_position_bias():
    from ftkit.evaluate.judge import compare

    items = [{"prompt": f"q{i}", "reference": "r", "first": "long answer " * (i + 2), "second": "short"}
             for i in range(10)]
    biased = compare(_Positional(), items)
    assert (biased["wins"], biased["losses"], biased["ties"]) == (0, 0, 10)
    assert biased["win_rate"] == 0.5 and biased["order_consistency"] == 0.0
    fair = compare(_PrefersLonger(), items)
    assert (fair["wins"], fair["ties"]) == (10, 0) and fair["win_rate"] == 1.0
    assert [v["forward"] + v["swapped"] for v in fair["verdicts"]] == ["AB"] * 10
    reverse = compare(_PrefersLonger(), [{**it, "first": it["second"], "second": it["first"]} for it in items])
    assert reverse["losses"] == 10 and reverse["win_rate"] == 0.0


def test_local_judge_answers_a_or_b(tiny_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from ftkit.evaluate.judge import LocalJudge, compare

    judge = LocalJudge(AutoModelForCausalLM.from_pretrained(tiny_path).eval(), tokenizer)
    got = compare(judge, [{"prompt": "Hi", "reference": "Hello!", "first": "Hello!", "second": "Go away."}] * 2)
    assert len(got["verdicts"]) == 2 and all(v["forward"] in ("A", "B") and v["swapped"] in ("A", "B")
                                             for v in got["verdicts"])


def test_endpoint_judge_through_openai_client():
    """The endpoint judge talks OpenAI's chat API over HTTP (a loopback server that always says 'B')."""
    import http.server
    import json
    import threading

    from ftkit.evaluate.judge import EndpointJudge, compare

    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            out = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                              "choices": [{"index": 0, "finish_reason": "stop",
                                           "message": {"role": "assistant", "content": "B."}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        judge = EndpointJudge(f"http://127.0.0.1:{srv.server_address[1]}/v1", "judge-model")
        got = compare(judge, [{"prompt": "Hi", "reference": "Hello", "first": "one", "second": "two"}])
    finally:
        srv.shutdown()
    assert got["ties"] == 1 and [v["forward"] for v in got["verdicts"]] == ["B"]
    assert len(seen) == 2 and seen[0]["temperature"] == 0 and seen[0]["model"] == "judge-model"
    prompts = [s["messages"][-1]["content"] for s in seen]
    assert "Reply A:\none" in prompts[0] and "Reply A:\ntwo" in prompts[1]  # the order really was swapped


# ----------------------------------------------------------------------------- stop rate and prompting

def _force_logits(model, token_ids, value):
    def hook(_module, _inputs, output):
        output[..., token_ids] = value
        return output

    return model.get_output_embeddings().register_forward_hook(hook)


def test_stop_rate_on_a_model_that_never_emits_eos(tiny_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from ftkit.core.modeling import stop_token_ids
    from ftkit.evaluate.scoring import score_generations

    model = AutoModelForCausalLM.from_pretrained(tiny_path).eval()
    stops = stop_token_ids(tokenizer)
    prompts = [[{"role": "user", "content": "Hello"}], [{"role": "user", "content": "Where is my parcel?"}]]
    handle = _force_logits(model, stops, float("-inf"))  # never emits end-of-turn or EOS
    never = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=2, stop_ids=stops)
    handle.remove()
    handle = _force_logits(model, stops[:1], 1e4)  # end-of-turn straight away
    always = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=2, stop_ids=stops)
    handle.remove()
    rules = RulesConfig()
    agg_never, _, _ = score_generations(["Hello", "parcel"], ["Hi", "Soon"], never, rules, "free_text")
    agg_always, _, _ = score_generations(["Hello", "parcel"], ["Hi", "Soon"], always, rules, "free_text")
    assert agg_never["stop_rate"] == 0.0 and agg_never["mean_new_tokens"] == 8
    assert agg_always["stop_rate"] == 1.0 and agg_always["mean_new_tokens"] == 0


def test_prompted_rows_train_only_the_conversations_own_reply(tokenizer):
    from ftkit.core.masking import IGNORE_INDEX
    from ftkit.evaluate.prompting import Prompting, prompted_row

    shots = [{"role": "user", "content": "Where is AC-111111?"}, {"role": "assistant", "content": "Shipped today."}]
    prompting = Prompting("Answer briefly.", shots, ["s1"])
    convo = [{"role": "system", "content": "Training prompt"}, {"role": "user", "content": "Refund please"},
             {"role": "assistant", "content": "Refund issued."}]
    row = prompted_row(tokenizer, convo, prompting)
    trained = tokenizer.decode([t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != IGNORE_INDEX])
    assert trained.startswith("Refund issued.") and "Shipped" not in trained
    text = tokenizer.decode(row["input_ids"])
    assert "Answer briefly." in text and "Training prompt" not in text and text.index("Shipped") < text.index("Refund")


# ----------------------------------------------------------------------------- the stage

@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_converted):
    from conftest import TINY_DEMO_SIZE, copy_run

    from ftkit.core.config import load_config
    from ftkit.evaluate.evaluation import evaluate_run
    from ftkit.train.training import run_training

    out = tmp_path_factory.mktemp("eval")
    cfg = load_config(experiment="e", outputs_dir=str(out), model={"name": "tiny-random"}, data={"demo_size": TINY_DEMO_SIZE},
                      train={"max_steps": 6, "batch_size": 4, "learning_rate": 5e-3, "eval_steps": 0},
                      evaluate={"num_generations": 6, "max_new_tokens": 12, "bootstrap_samples": 200,
                                "forgetting": {"num_generations": 4, "max_new_tokens": 8},
                                "prompting": {"system_prompt": "Be brief.", "few_shot": 2},
                                "rules": {"required_phrases": ["— AcmeCorp Support"]}})
    paths = copy_run(tiny_converted, out, cfg.experiment)
    run_training(cfg, paths)
    return cfg, paths, evaluate_run(cfg, paths)


def test_evaluate_run_reports_three_models_with_intervals(evaluated):
    _, paths, m = evaluated
    for name in ("base", "prompted", "tuned"):
        for k in ("loss", "perplexity", "rougeL", "rule_pass_rate", "stop_rate", "chrF", "bleu", "token_f1"):
            assert m[name][k] is not None, (name, k)
        ci = m[name]["ci"]["loss"]
        assert ci["ci_low"] <= ci["value"] <= ci["ci_high"]
    for pair in ("tuned_vs_base", "tuned_vs_prompted", "prompted_vs_base"):
        d = m["deltas"][pair]["loss"]
        assert d["ci_low"] <= d["delta"] <= d["ci_high"]
    assert m["deltas"]["tuned_vs_base"]["loss"]["delta"] == pytest.approx(m["tuned"]["loss"] - m["base"]["loss"])
    assert m["verdict"] and all(s.startswith("Fine-tuning") for s in m["verdict"])
    assert m["reference"]["rule_pass_rate"] == 1.0  # every demo reply ends with the sign-off
    assert m["forgetting"]["examples"] == 40 and isinstance(m["forgetting"]["flag"], bool)
    assert len(m["few_shot_ids"]) == 2 and m["test_examples"] > 0
    from ftkit.core.files import read_jsonl

    rows = read_jsonl(paths.generations)
    assert len(rows) == 6 and {"base", "prompted", "tuned", "reference"} <= set(rows[0])


def test_evaluate_run_is_reproducible(evaluated):
    from ftkit.evaluate.evaluation import evaluate_run

    cfg, paths, first = evaluated
    again = evaluate_run(cfg, paths)
    first, again = dict(first), dict(again)
    first.pop("seconds"), again.pop("seconds")
    assert again == first


def test_evaluate_config_errors_name_the_field():
    from ftkit.core.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(evaluate={"confidence": 95, "judge": {"enabled": True}, "prompting": {"few_shot": -1}})
    msg = str(e.value)
    assert "evaluate.confidence" in msg and "evaluate.judge" in msg and "evaluate.prompting.few_shot" in msg
