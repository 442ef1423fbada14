"""Stage 04: held-out loss, greedy generations, ROUGE-L and house-style rules, base vs tuned.

Loss is streamed: each batch's per-token losses are summed and its logits dropped, so memory
does not grow with the test set. "Base" is the same model with the adapter disabled, so both
numbers come from identical weights, tokens and masks.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass

import torch

from .config import RulesConfig
from .formats import prompt_and_reference
from .masking import IGNORE_INDEX, render
from .train import PadCollator


@torch.no_grad()
def heldout_loss(model, rows: list[dict], pad_token_id: int, batch_size: int = 8) -> dict:
    """Mean loss per trained (assistant) token over ``rows`` and its perplexity."""
    device = next(model.parameters()).device
    collate = PadCollator(pad_token_id)
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[i:i + batch_size]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        shift_logits = logits[:, :-1].float()
        shift_labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum",
        )
        total += loss.item()
        count += int((shift_labels != IGNORE_INDEX).sum())
        del logits, shift_logits
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50)), "tokens": count}


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int, batch_size: int,
             stop_ids: list[int]) -> list[dict]:
    """Greedy replies for chat prompts, batched with left padding; marks whether each one stopped."""
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out = []
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [render(tokenizer, p, add_generation_prompt=True) for p in prompts[i:i + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            gen = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = gen[:, enc["input_ids"].shape[1]:]
            for row in new.tolist():
                stopped = any(t in stop_ids for t in row)
                if stopped:
                    row = row[: next(k for k, t in enumerate(row) if t in stop_ids)]
                out.append({"text": tokenizer.decode(row, skip_special_tokens=True).strip(),
                            "stopped": stopped, "new_tokens": len(row), "token_ids": row})
    finally:
        tokenizer.padding_side = side
    return out


_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")


def count_sentences(text: str) -> int:
    """Sentences in ``text``: runs of . ! ? followed by whitespace or the end; trailing text counts one."""
    text = text.strip()
    if not text:
        return 0
    ends = list(_SENTENCE_END.finditer(text))
    tail = text[ends[-1].end():].strip() if ends else text
    return len(ends) + (1 if tail else 0)


@dataclass
class RuleResult:
    passed: bool
    failures: list[str]


def check_rules(reply: str, prompt_text: str, rules: RulesConfig) -> RuleResult:
    """Check one reply against the configured house-style rules."""
    failures = []
    body = reply
    for phrase in rules.ignore_for_sentences:
        body = body.replace(phrase, " ")
    if rules.max_sentences is not None and count_sentences(body) > rules.max_sentences:
        failures.append(f"more than {rules.max_sentences} sentences ({count_sentences(body)})")
    for phrase in rules.required_phrases:
        if phrase not in reply:
            failures.append(f"missing required phrase {phrase!r}")
    for pattern in rules.must_match:
        if not re.search(pattern, reply):
            failures.append(f"does not match /{pattern}/")
    for pattern in rules.must_not_match:
        if re.search(pattern, reply):
            failures.append(f"matches forbidden /{pattern}/")
    if rules.echo_pattern:
        for wanted in re.findall(rules.echo_pattern, prompt_text):
            if wanted not in reply:
                failures.append(f"does not repeat {wanted!r} from the prompt")
    return RuleResult(not failures, failures)


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]


def score_generations(records: list[dict], gens: list[dict], rules: RulesConfig) -> tuple[dict, list[dict]]:
    """Aggregate metrics for one model's generations plus per-example rows."""
    refs = [prompt_and_reference(r["messages"])[1] for r in records]
    preds = [g["text"] for g in gens]
    rouge = rouge_l(preds, refs)
    rows = []
    for rec, gen, rl in zip(records, gens, rouge, strict=True):
        prompt_text = "\n".join(m["content"] for m in rec["messages"][:-1] if m["role"] == "user")
        rr = check_rules(gen["text"], prompt_text, rules)
        rows.append({"rougeL": rl, "rules_passed": rr.passed, "rule_failures": rr.failures,
                     "stopped": gen["stopped"], "new_tokens": gen["new_tokens"], "text": gen["text"]})
    n = max(len(rows), 1)
    return {
        "rougeL": sum(rouge) / n,
        "rule_pass_rate": sum(r["rules_passed"] for r in rows) / n,
        "stop_rate": sum(r["stopped"] for r in rows) / n,
        "mean_new_tokens": sum(r["new_tokens"] for r in rows) / n,
        "generations": len(rows),
    }, rows


def adapter_disabled(model):
    """Context manager: the base model's behaviour (a no-op for a model without adapters)."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def evaluate_run(cfg, paths) -> dict:
    """Run stage 04: base vs tuned on the test split; writes generations; returns the metrics."""
    from .modeling import load_model, resolve_model_path, stop_token_ids
    from .paths import read_jsonl, write_jsonl
    from .train import load_adapter_model, load_tokens, trained_info

    e = cfg.evaluate
    model, tok = load_adapter_model(cfg, paths)
    full = trained_info(paths).get("method") == "full"
    base_model = load_model(resolve_model_path(cfg.model.name), cfg.model) if full else model
    rows = load_tokens(paths.require(paths.tokens("test"), "02_format_conversion"))
    records = [r for r in read_jsonl(paths.chat("test")) if "messages" in r]  # text records have no prompt
    stop_ids = stop_token_ids(tok)
    sample = records[: e.num_generations]
    prompts = [prompt_and_reference(r["messages"])[0] for r in sample]
    gen_kw = {"max_new_tokens": e.max_new_tokens, "batch_size": e.batch_size, "stop_ids": stop_ids}

    results, per_example = {}, {}
    for name in ("base", "tuned"):
        m = base_model if name == "base" else model
        with adapter_disabled(m) if name == "base" and not full else contextlib.nullcontext():
            loss = heldout_loss(m, rows, tok.pad_token_id, e.batch_size)
            gens = generate(m, tok, prompts, **gen_kw)
        scores, per_example[name] = score_generations(sample, gens, e.rules)
        results[name] = {**loss, **scores}

    write_jsonl(paths.generations, [
        {"prompt": p[-1]["content"], "reference": prompt_and_reference(r["messages"])[1],
         "base": b["text"], "tuned": t["text"], "base_rules": b["rule_failures"], "tuned_rules": t["rule_failures"],
         "base_stopped": b["stopped"], "tuned_stopped": t["stopped"]}
        for p, r, b, t in zip(prompts, sample, per_example["base"], per_example["tuned"], strict=True)
    ])
    keys = ("loss", "perplexity", "rougeL", "rule_pass_rate", "stop_rate")
    return {
        **results,
        "deltas": {k: results["tuned"][k] - results["base"][k] for k in keys},
        "loss_reduction": 1 - results["tuned"]["loss"] / results["base"]["loss"],
        "test_examples": len(rows),
        "generations": len(sample),
        "stop_token_ids": stop_ids,
    }
