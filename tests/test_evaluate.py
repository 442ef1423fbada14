import pytest
import torch

from ftkit.config import RulesConfig
from ftkit.evaluate import check_rules, count_sentences, generate, heldout_loss, rouge_l


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

    from ftkit.masking import build_example

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
