"""Generated replies scored against references, models compared with paired bootstrap intervals, and
the verdict written from the intervals."""

from __future__ import annotations

from ftkit.core.config import PREFERENCE_OBJECTIVES, RulesConfig
from ftkit.evaluate.metrics import (
    Sample,
    bleu,
    bootstrap_ci,
    chrf,
    exact_match,
    json_valid,
    label_metrics,
    length_stats,
    normalize_label,
    paired_bootstrap,
    rouge_l,
    token_f1,
)
from ftkit.evaluate.rules import check_rules, has_rules

# ``sft``: the adapter a preference run started from (train.init_adapter), only when there is one
MODELS = ("base", "prompted", "sft", "tuned")


PAIRS = (("tuned", "base"), ("tuned", "prompted"), ("prompted", "base"), ("tuned", "sft"))


LOWER_IS_BETTER = {"loss", "perplexity"}


PER_EXAMPLE = ("rougeL", "chrF", "bleu", "exact_match", "token_f1", "rule_pass_rate", "stop_rate",
               "mean_new_tokens")


def score_generations(prompt_texts: list[str], references: list[str], gens: list[dict], rules: RulesConfig,
                      task: str) -> tuple[dict, dict[str, list[float]], list[dict]]:
    """Aggregates, per-example metric values (for the bootstrap) and per-example rows for one model."""
    preds = [g["text"] for g in gens]
    per: dict[str, list[float]] = {
        "rougeL": rouge_l(preds, references),
        "chrF": [chrf(p, r) for p, r in zip(preds, references, strict=True)],
        "bleu": [bleu(p, r) for p, r in zip(preds, references, strict=True)],
        "exact_match": [exact_match(p, r) for p, r in zip(preds, references, strict=True)],
        "token_f1": [token_f1(p, r) for p, r in zip(preds, references, strict=True)],
        "stop_rate": [float(g["stopped"]) for g in gens],
        "mean_new_tokens": [float(g["new_tokens"]) for g in gens],
    }
    rule_results = [check_rules(p, q, rules) for p, q in zip(preds, prompt_texts, strict=True)]
    if has_rules(rules):
        per["rule_pass_rate"] = [float(r.passed) for r in rule_results]
    if task == "label":
        per["accuracy"] = [float(normalize_label(p) == normalize_label(r)) for p, r in zip(preds, references, strict=True)]
    if task == "json":
        per["json_valid_rate"] = [float(json_valid(p)) for p in preds]
    agg = {k: sum(v) / max(len(v), 1) for k, v in per.items()}
    agg.setdefault("rule_pass_rate", None)  # no rules configured
    agg["length"] = {"tokens": length_stats(per["mean_new_tokens"]),
                     "words": length_stats([float(len(p.split())) for p in preds])}
    if task == "label":
        agg.update(label_metrics(preds, references))
    rows = [{"text": g["text"], "stopped": g["stopped"], "new_tokens": g["new_tokens"],
             "rules_passed": rr.passed, "rule_failures": rr.failures}
            for g, rr in zip(gens, rule_results, strict=True)]
    return agg, per, rows


def _ppl(x):
    import numpy as np

    return np.exp(np.minimum(x, 50))


def compare_models(samples: dict[str, dict[str, Sample]], resamples: int, confidence: float, seed: int) -> tuple:
    """Per-model intervals and paired differences for every metric the models share."""
    kw = {"resamples": resamples, "confidence": confidence, "seed": seed}
    cis = {m: {} for m in samples}
    for m, metrics in samples.items():
        for k, s in metrics.items():
            cis[m][k] = bootstrap_ci(s, **kw)
            if k == "loss":
                cis[m]["perplexity"] = bootstrap_ci(s, transform=_ppl, **kw)
    deltas = {}
    for a, b in PAIRS:
        if a not in samples or b not in samples:
            continue
        d = {}
        for k in samples[a].keys() & samples[b].keys():
            d[k] = paired_bootstrap(samples[b][k], samples[a][k], **kw)
            if k == "loss":
                d["perplexity"] = paired_bootstrap(samples[b][k], samples[a][k], transform=_ppl, **kw)
        deltas[f"{a}_vs_{b}"] = d
    return cis, deltas


NAMES = {"loss": "held-out loss", "perplexity": "perplexity", "rule_pass_rate": "house-rule pass rate",
         "rougeL": "ROUGE-L", "chrF": "chrF", "bleu": "BLEU", "exact_match": "exact match", "token_f1": "token F1",
         "stop_rate": "stop rate", "accuracy": "label accuracy", "json_valid_rate": "JSON validity",
         "mean_new_tokens": "reply length (tokens)"}


HEADLINE = ("loss", "rule_pass_rate", "rougeL", "chrF", "token_f1", "accuracy", "json_valid_rate", "stop_rate")


def verdict(deltas: dict, confidence: float, objective: str = "instruction") -> list[str]:
    """Plain-words conclusions: for each headline metric, is fine-tuning ahead of prompting and of the base
    (and, for a run that started from an earlier adapter, of that adapter)?"""
    lines = []
    level = f"{round(confidence * 100)}% CI"
    preference = objective in PREFERENCE_OBJECTIVES
    start = "the SFT model it started from" if preference else "the adapter it started from"
    for pair, rival in (("tuned_vs_prompted", "prompting"), ("tuned_vs_base", "the base model"),
                        ("tuned_vs_sft", start)):
        who = ("Preference tuning" if preference else "Further tuning") if pair == "tuned_vs_sft" else "Fine-tuning"
        for k in HEADLINE:
            d = deltas.get(pair, {}).get(k)
            if d is None:
                continue
            better = -d["delta"] if k in LOWER_IS_BETTER else d["delta"]
            low, high = d["ci_low"], d["ci_high"]
            excludes_zero = low > 0 or high < 0
            word = "lower" if d["delta"] < 0 else "higher"
            amount = f"{abs(d['delta']):.3g} {word} ({level} of the difference [{low:.3g}, {high:.3g}])"
            if d["delta"] == 0 and low == high == 0:
                lines.append(f"{who} vs {rival} on {NAMES[k]}: identical on every prompt.")
            elif not excludes_zero:
                lines.append(f"{who} vs {rival} on {NAMES[k]}: no clear difference, {amount}.")
            elif better > 0:
                lines.append(f"{who} beats {rival} on {NAMES[k]}: {amount}.")
            else:
                lines.append(f"{who} trails {rival} on {NAMES[k]}: {amount}.")
    return lines
