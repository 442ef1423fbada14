"""Stage 04: did fine-tuning help, and what did it cost? Base, prompted base and tuned, side by side.

Three models answer the same held-out test prompts:

- ``base``: the base model (for adapters: the same weights with the adapter disabled);
- ``prompted``: the base model given ``evaluate.prompting.system_prompt`` and ``few_shot`` train
  conversations (a seeded choice, the same for every prompt) before each test prompt;
- ``tuned``: the fine-tuned model.

Loss and perplexity are per trained (assistant) token over the test split, streamed: each batch's
per-example losses are summed and its logits dropped, rows are read from disk in chunks, so memory
does not grow with the test set. Generations (greedy unless ``do_sample``) for the first
``num_generations`` test prompts are scored with ROUGE-L, chrF, BLEU, exact match, token F1, the
house rules, the stop rate and length; label accuracy/F1 and JSON validity when the task calls
for them. Every difference between two models comes with a paired bootstrap interval over the
same examples. A general-ability check (forgetting) and an optional LLM judge complete it.

``04_evaluate.json`` keys: ``base``/``prompted``/``tuned`` (each: ``loss``, ``perplexity``, ``tokens``,
``rougeL``, ``chrF``, ``bleu``, ``exact_match``, ``token_f1``, ``rule_pass_rate``, ``stop_rate``,
``mean_new_tokens``, ``length`` {tokens, words: mean/median/p90/max}, ``ci`` {metric: value, ci_low,
ci_high}, and ``accuracy``/``macro_f1``/``confusion_matrix`` for labels or ``json_valid_rate`` for
JSON); ``deltas`` {``tuned_vs_base``, ``tuned_vs_prompted``, ``prompted_vs_base``: {metric: delta,
ci_low, ci_high}}; ``verdict`` (sentences); ``forgetting``; ``overfitting``; ``judge`` (when on);
``reference`` (the references' own rule pass rate and length: the ceiling); ``task``, ``test_examples``, ``generations``, ``few_shot_ids``, ``stop_token_ids``, ``seconds``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import random
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from . import reasoning
from .config import RulesConfig
from .formats import prompt_and_reference, with_system_prompt
from .masking import IGNORE_INDEX, TemplateError, build_example, closing_suffix, render
from .metrics import (
    Sample,
    bleu,
    bootstrap_ci,
    chrf,
    exact_match,
    infer_task,
    json_valid,
    label_metrics,
    length_stats,
    normalize_label,
    paired_bootstrap,
    rouge_l,
    token_f1,
)
from .modeling import forward_params
from .paths import iter_jsonl
from .train import PadCollator, takes_logit_positions

log = logging.getLogger(__name__)

MODELS = ("base", "prompted", "tuned")
PAIRS = (("tuned", "base"), ("tuned", "prompted"), ("prompted", "base"))
LOWER_IS_BETTER = {"loss", "perplexity"}
CHUNK = 256  # rows read (and length-sorted) at a time for the loss pass


# ----------------------------------------------------------------------------- loss

@torch.no_grad()
def example_losses(model, rows: Iterable[dict], pad_token_id: int, batch_size: int = 8,
                   max_batch_tokens: int | None = None) -> tuple[list, list]:
    """Summed token loss and trained-token count of each row (``input_ids``/``labels``), in input order.

    Rows are consumed lazily, CHUNK at a time, sorted by length inside a chunk so that batches
    carry little padding; a batch holds at most ``max_batch_tokens`` padded tokens (default
    ``batch_size`` x 512), so the logits of one batch, the largest allocation, have a fixed
    ceiling whatever the number or mix of rows; each batch's logits are freed before the next.
    Logits are computed only at positions whose next token is trained (``logits_to_keep``), so
    prompt tokens cost no vocabulary projection.

    A row may carry ``prefix_len``: its first ``prefix_len`` tokens are untrained and shared with
    other rows (the prompted model's system prompt and few-shot turns). Rows sharing a prefix are
    then run on one cached forward of it (:func:`_prefix_groups`, :func:`_prefix_cache`) instead of each
    re-reading it.
    """
    max_batch_tokens = max_batch_tokens or batch_size * 512
    device = next(model.parameters()).device
    collate = PadCollator(pad_token_id)
    sums, counts = [], []
    chunk: list[dict] = []
    cache_arg = _cache_kwarg(model)
    positions = takes_logit_positions(model)  # else: all positions, then select

    def batches(rows_: list[dict], order: list[int]) -> Iterator[list[int]]:
        """Up to ``batch_size`` rows and ``max_batch_tokens`` padded tokens per batch (a longer row goes alone)."""
        idx: list[int] = []
        for j in order:
            longest = len(rows_[j]["input_ids"])  # rows come sorted by length, so the newest is the longest
            if idx and (len(idx) == batch_size or (len(idx) + 1) * longest > max_batch_tokens):
                yield idx
                idx = []
            idx.append(j)
        if idx:
            yield idx

    def score(rows_: list[dict], members: list[int], s: list, c: list, cache=None) -> None:
        order = sorted(members, key=lambda i: len(rows_[i]["input_ids"]))
        for idx in batches(rows_, order):
            batch = {k: v.to(device) for k, v in collate([rows_[j] for j in idx]).items()}
            # logits only where some row of the batch has a trained next token: prompts need none
            keep = (batch["labels"][:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1)
            kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            if cache is not None:
                past = copy.deepcopy(cache)
                past.batch_repeat_interleave(len(idx))
                ones = torch.ones(len(idx), past.get_seq_length(), dtype=kw["attention_mask"].dtype, device=device)
                kw.update(attention_mask=torch.cat([ones, kw["attention_mask"]], 1), use_cache=True,
                          **{cache_arg: past})
            logits = model(**kw, logits_to_keep=keep).logits if positions else model(**kw).logits[:, keep]
            labels = batch["labels"][:, keep + 1]
            loss = torch.nn.functional.cross_entropy(
                logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
            for j, ls, n in zip(idx, loss.sum(1).tolist(), (labels != IGNORE_INDEX).sum(1).tolist(), strict=True):
                s[j], c[j] = ls, n
            del logits, loss, kw

    def flush():
        s, c = [0.0] * len(chunk), [0] * len(chunk)
        plain, shared = _prefix_groups(chunk)
        if plain:
            score(chunk, plain, s, c)
        for prefix, members in shared.items():
            cache = _prefix_cache(model, prefix, device)
            if cache is None:  # this model cannot continue from a cache: read every row whole
                score(chunk, members, s, c)
                continue
            # each row continues from the prefix's last token, whose logits predict the row's first own token
            tails = {j: {"input_ids": chunk[j]["input_ids"][len(prefix):], "labels": chunk[j]["labels"][len(prefix):]}
                     for j in members}
            tail_rows = [tails.get(j, chunk[j]) for j in range(len(chunk))]
            score(tail_rows, members, s, c, cache)
        sums.extend(s)
        counts.extend(c)
        chunk.clear()

    for row in rows:
        chunk.append(row)
        if len(chunk) == CHUNK:
            flush()
    if chunk:
        flush()
    return sums, counts


def _prefix_groups(rows: list[dict]) -> tuple[list[int], dict[tuple, list[int]]]:
    """Rows read whole, and rows grouped by the shared prefix they continue from (all but the last
    token of their untrained ``prefix_len`` tokens; at least two rows and 16 tokens to be worth a cache)."""
    plain, shared = [], {}
    for j, r in enumerate(rows):
        p = r.get("prefix_len") or 0
        if p > 16 and all(x == IGNORE_INDEX for x in r["labels"][:p]):
            shared.setdefault(tuple(r["input_ids"][: p - 1]), []).append(j)
        else:
            plain.append(j)
    for key in [k for k, v in shared.items() if len(v) < 2]:
        plain += shared.pop(key)
    return plain, shared


def _cache_kwarg(model) -> str:
    """The forward argument that takes a key/value cache: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    return "cache" if "cache" in forward_params(model) else "past_key_values"


def _prefix_cache(model, prefix: tuple, device):
    """The key/value cache of one forward over ``prefix``, or None where the model has no such cache."""
    try:
        out = model(input_ids=torch.tensor([prefix], device=device), use_cache=True)
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = getattr(out, "past_key_values", None)
        if cache is None or not hasattr(cache, "batch_repeat_interleave"):
            return None
        return cache
    except (TypeError, ValueError, NotImplementedError) as err:
        log.warning("prefix cache unavailable (%s); the prompted rows are read whole", err)
        return None


def summarise_loss(sums: list[float], counts: list[int]) -> dict:
    total = sum(counts)
    mean = sum(sums) / max(total, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50)), "tokens": total}


def heldout_loss(model, rows: Iterable[dict], pad_token_id: int, batch_size: int = 8) -> dict:
    """Mean loss per trained (assistant) token over ``rows`` and its perplexity."""
    return summarise_loss(*example_losses(model, rows, pad_token_id, batch_size))


# ----------------------------------------------------------------------------- prompting

@dataclass
class Prompting:
    """How the ``prompted`` model sees a conversation: a system prompt and few-shot turns in front."""

    system_prompt: str | None
    shots: list[dict]  # user/assistant messages
    shot_ids: list

    def head(self, messages: list[dict]) -> list[dict]:
        """What goes before the conversation's own turns: the system prompt, then the few-shot turns."""
        own = [m for m in messages if m["role"] == "system"][:1]
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else own
        return system + self.shots

    def apply(self, messages: list[dict]) -> list[dict]:
        return self.head(messages) + [m for m in messages if m["role"] != "system"]


def choose_shots(train_chat: Path, k: int, seed: int) -> tuple[list[dict], list]:
    """``k`` train conversations by reservoir sampling (seeded; reads the file once, holds ``k``)."""
    rng = random.Random(seed)
    pool: list[dict] = []
    n = 0
    if k:
        for rec in iter_jsonl(train_chat):
            msgs = rec.get("messages")
            if not msgs or (rec.get("meta") or {}).get("source", "").startswith("general"):
                continue
            n += 1
            if len(pool) < k:
                pool.append(rec)
            else:
                j = rng.randrange(n)
                if j < k:
                    pool[j] = rec
    shots, ids = [], []
    for rec in pool:
        turns = [m for m in rec["messages"] if m["role"] != "system"]
        first_reply = next(i for i, m in enumerate(turns) if m["role"] == "assistant")
        shots += [{"role": m["role"], "content": m["content"]} for m in turns[: first_reply + 1]]
        ids.append(rec.get("id"))
    return shots, ids


def prompted_row(tokenizer, messages: list[dict], prompting: Prompting) -> dict:
    """Tokens of the prompted conversation with labels only on the conversation's own assistant turns."""
    ex = build_example(tokenizer, prompting.apply(messages))
    head = prompting.head(messages)
    if not head:
        return ex.to_dict()
    head_text = render(tokenizer, head)
    if (final := closing_suffix(tokenizer)) and head_text.endswith(final):  # Phi-3.5's conversation-final EOS
        head_text = head_text[: len(head_text) - len(final)]
    prefix_ids = tokenizer(head_text, add_special_tokens=False)["input_ids"]
    if ex.input_ids[: len(prefix_ids)] != prefix_ids:
        raise ValueError("the chat template does not render the few-shot prefix as a prefix of the prompted "
                         "conversation; set evaluate.prompting.few_shot: 0")
    labels = [IGNORE_INDEX] * len(prefix_ids) + ex.labels[len(prefix_ids):]
    return {"input_ids": ex.input_ids, "labels": labels, "prefix_len": len(prefix_ids)}


# ----------------------------------------------------------------------------- generation

@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int, batch_size: int,
             stop_ids: list[int], do_sample: bool = False, temperature: float = 0.7, top_p: float = 0.95,
             seed: int | None = None) -> list[dict]:
    """Replies for chat prompts, batched with left padding and the KV cache; marks whether each stopped.

    A reply "stopped" when the model emitted one of ``stop_ids`` (the template's end-of-turn or
    EOS) before ``max_new_tokens``; the rest ran on until the cap.
    """
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    if seed is not None:
        torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else \
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    markers = reasoning.markers_for(tokenizer)
    out = []
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [render(tokenizer, p, add_generation_prompt=True) for p in prompts[i:i + batch_size]]
            inside = [reasoning.starts_inside(t, markers) for t in texts]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                                 pad_token_id=tokenizer.pad_token_id, use_cache=True, **sampling)
            new = gen[:, enc["input_ids"].shape[1]:]
            for row, opened in zip(new.tolist(), inside, strict=True):
                stopped = any(t in stop_ids for t in row)
                if stopped:
                    row = row[: next(k for k, t in enumerate(row) if t in stop_ids)]
                # the answer is what is scored, as the server returns it in ``content``
                thought, text = reasoning.split(tokenizer.decode(row, skip_special_tokens=True), markers, opened)
                out.append({"text": text.strip(), "reasoning": thought,
                            "stopped": stopped, "new_tokens": len(row), "token_ids": row})
    finally:
        tokenizer.padding_side = side
    return out


# ----------------------------------------------------------------------------- house rules

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


def has_rules(rules: RulesConfig) -> bool:
    return bool(rules.max_sentences is not None or rules.required_phrases or rules.must_match
                or rules.must_not_match or rules.echo_pattern)


# ----------------------------------------------------------------------------- scoring

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


def adapter_disabled(model):
    """Context manager: the base model's behaviour (a no-op for a model without adapters)."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


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


def verdict(deltas: dict, confidence: float) -> list[str]:
    """Plain-words conclusions: for each headline metric, is fine-tuning ahead of prompting and of the base?"""
    lines = []
    level = f"{round(confidence * 100)}% CI"
    for pair, rival in (("tuned_vs_prompted", "prompting"), ("tuned_vs_base", "the base model")):
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
                lines.append(f"Fine-tuning vs {rival} on {NAMES[k]}: identical on every prompt.")
            elif not excludes_zero:
                lines.append(f"Fine-tuning vs {rival} on {NAMES[k]}: no clear difference, {amount}.")
            elif better > 0:
                lines.append(f"Fine-tuning beats {rival} on {NAMES[k]}: {amount}.")
            else:
                lines.append(f"Fine-tuning trails {rival} on {NAMES[k]}: {amount}.")
    return lines


# ----------------------------------------------------------------------------- forgetting

def general_records(path: str | None) -> list[dict]:
    """General questions with reference answers: the user's file or the 40 shipped ones."""
    if path:
        from .replay import from_file

        recs = from_file(path)
    else:
        text = resources.files("ftkit").joinpath("resources/general_eval.jsonl").read_text(encoding="utf-8")
        recs = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [r for r in recs if r.get("messages") and r["messages"][-1]["role"] == "assistant"]


def forgetting_check(cfg, tok, base_ctx, tuned_model, base_model, stop_ids: list[int]) -> dict:
    """Base vs tuned on general questions: loss on reference answers, stop rate and token F1 of replies."""
    f = cfg.evaluate.forgetting
    e = cfg.evaluate
    recs = [{**r, "messages": with_system_prompt(r["messages"], cfg.convert.system_prompt)}
            for r in general_records(f.path)]
    rows = [build_example(tok, r["messages"]).to_dict() for r in recs]
    sample = recs[: f.num_generations]
    prompts = [prompt_and_reference(r["messages"])[0] for r in sample]
    refs = [prompt_and_reference(r["messages"])[1] for r in sample]
    out, samples = {}, {}
    for name, model in (("base", base_model), ("tuned", tuned_model)):
        with base_ctx() if name == "base" else contextlib.nullcontext():
            sums, counts = example_losses(model, rows, tok.pad_token_id, e.batch_size)
            gens = generate(model, tok, prompts, max_new_tokens=f.max_new_tokens, batch_size=e.batch_size,
                            stop_ids=stop_ids, seed=cfg.seed)
        out[name] = {**summarise_loss(sums, counts),
                     "stop_rate": sum(g["stopped"] for g in gens) / max(len(gens), 1),
                     "token_f1": sum(token_f1(g["text"], r) for g, r in zip(gens, refs, strict=True)) / max(len(gens), 1)}
        samples[name] = Sample.of(sums, counts)
        out[name + "_replies"] = [g["text"] for g in gens[:5]]
    kw = {"resamples": e.bootstrap_samples, "confidence": e.confidence, "seed": cfg.seed}
    loss_delta = paired_bootstrap(samples["base"], samples["tuned"], **kw)
    rel = out["tuned"]["loss"] / out["base"]["loss"] - 1
    stop_drop = out["base"]["stop_rate"] - out["tuned"]["stop_rate"]
    reasons = []
    if rel > f.max_loss_increase:
        reasons.append(f"general-answer loss rose {100 * rel:.1f}% (limit {100 * f.max_loss_increase:.0f}%)")
    if stop_drop > f.max_stop_rate_drop:
        reasons.append(f"stop rate on general questions fell by {100 * stop_drop:.0f} points "
                       f"(limit {100 * f.max_stop_rate_drop:.0f})")
    return {**out, "loss_delta": loss_delta, "relative_loss_increase": rel, "stop_rate_drop": stop_drop,
            "flag": bool(reasons), "reason": "; ".join(reasons) or "no degradation beyond the configured limits",
            "examples": len(rows), "source": f.path or "ftkit/resources/general_eval.jsonl"}


# ----------------------------------------------------------------------------- the stage

def evaluate_run(cfg, paths) -> dict:
    """Run stage 04; writes per-example generations; returns the metrics for ``04_evaluate.json``."""
    from .modeling import load_model, resolve_model_path, stop_token_ids
    from .paths import write_jsonl
    from .train import load_adapter_model, trained_info

    started = time.perf_counter()
    e = cfg.evaluate
    model, tok = load_adapter_model(cfg, paths)
    info = trained_info(paths)
    full = info.get("method") == "full"
    base_model = load_model(resolve_model_path(cfg.model.name), cfg.model) if full else model

    def base_ctx():
        return contextlib.nullcontext() if full else adapter_disabled(model)

    stop_ids = stop_token_ids(tok)
    chat_path = paths.require(paths.chat("test"), "02_format_conversion")
    tokens_path = paths.require(paths.tokens("test"), "02_format_conversion")
    completion = info.get("objective") == "completion"

    def token_rows() -> Iterator[dict]:
        for i, r in enumerate(iter_jsonl(tokens_path)):
            if e.max_examples is not None and i >= e.max_examples:
                return
            labels = [IGNORE_INDEX] + r["input_ids"][1:] if completion else r["labels"]
            yield {"input_ids": r["input_ids"], "labels": labels}

    shots, shot_ids = choose_shots(paths.chat("train"), e.prompting.few_shot, cfg.seed) \
        if paths.chat("train").exists() else ([], [])
    prompting = Prompting(e.prompting.system_prompt, shots, shot_ids)
    few_shot_note = None
    first = next((r for r in iter_jsonl(chat_path) if "messages" in r), None)
    if shots and first is not None:
        try:
            prompted_row(tok, first["messages"], prompting)
        except (TemplateError, ValueError) as err:  # templates that rewrite earlier turns (Qwen3's reasoning)
            few_shot_note = f"few-shot examples left out of the prompted baseline: {err}"
            log.warning(few_shot_note)
            shots, shot_ids = [], []
            prompting = Prompting(e.prompting.system_prompt, shots, shot_ids)

    def prompted_rows() -> Iterator[dict]:
        for i, r in enumerate(iter_jsonl(chat_path)):
            if e.max_examples is not None and i >= e.max_examples:
                return
            yield prompted_row(tok, r["messages"], prompting)

    # the generation sample: the first num_generations test conversations that have a prompt
    sample = []
    for r in iter_jsonl(chat_path):
        if len(sample) == e.num_generations:
            break
        if "messages" in r:
            sample.append(r)
    chat_data = bool(sample)
    prompts = [prompt_and_reference(r["messages"])[0] for r in sample]
    refs = [prompt_and_reference(r["messages"])[1] for r in sample]
    prompt_texts = ["\n".join(m["content"] for m in p if m["role"] == "user") for p in prompts]
    task = e.task if e.task != "auto" else infer_task(refs)
    gen_kw = {"max_new_tokens": e.max_new_tokens, "batch_size": e.batch_size, "stop_ids": stop_ids,
              "do_sample": e.do_sample, "temperature": e.temperature, "top_p": e.top_p, "seed": cfg.seed}

    results, samples, per_rows, seconds = {}, {}, {}, {}
    for name in MODELS if chat_data else ("base", "tuned"):
        t0 = time.perf_counter()
        m = model if name == "tuned" else base_model
        with base_ctx() if name != "tuned" else contextlib.nullcontext():
            rows = prompted_rows() if name == "prompted" else token_rows()
            sums, counts = example_losses(m, rows, tok.pad_token_id, e.batch_size)
            model_prompts = [prompting.apply(p) for p in prompts] if name == "prompted" else prompts
            gens = generate(m, tok, model_prompts, **gen_kw) if chat_data else []
        agg, per, per_rows[name] = score_generations(prompt_texts, refs, gens, e.rules, task)
        results[name] = {**summarise_loss(sums, counts), **agg}
        samples[name] = {"loss": Sample.of(sums, counts), **{k: Sample.of(v) for k, v in per.items()}}
        seconds[name] = time.perf_counter() - t0

    # the references through the same rules: the ceiling a model that writes like the data would reach
    reference = {"rule_pass_rate": (sum(check_rules(r, q, e.rules).passed for r, q in zip(refs, prompt_texts, strict=True))
                                    / max(len(refs), 1)) if has_rules(e.rules) else None,
                 "length": {"words": length_stats([float(len(r.split())) for r in refs])}}
    cis, deltas = compare_models(samples, e.bootstrap_samples, e.confidence, cfg.seed)
    for name in results:
        results[name]["ci"] = cis[name]

    write_jsonl(paths.generations, [
        {"prompt": p[-1]["content"], "reference": ref,
         **{n: per_rows[n][i]["text"] for n in per_rows},
         **{f"{n}_rules": per_rows[n][i]["rule_failures"] for n in per_rows},
         **{f"{n}_stopped": per_rows[n][i]["stopped"] for n in per_rows}}
        for i, (p, ref) in enumerate(zip(prompts, refs, strict=True))
    ])

    t0 = time.perf_counter()
    forgetting = forgetting_check(cfg, tok, base_ctx, model, base_model, stop_ids)
    seconds["forgetting"] = time.perf_counter() - t0

    judge = None
    if e.judge.enabled and chat_data:
        from .judge import build_judge, compare

        t0 = time.perf_counter()
        jdg = build_judge(cfg)
        n = min(e.judge.max_pairs, len(sample))
        judge = {}
        for rival in ("base", "prompted"):
            items = [{"prompt": prompt_texts[i], "reference": refs[i], "first": per_rows["tuned"][i]["text"],
                      "second": per_rows[rival][i]["text"]} for i in range(n)]
            judge[f"tuned_vs_{rival}"] = compare(jdg, items, resamples=e.bootstrap_samples,
                                                 confidence=e.confidence, seed=cfg.seed)
        seconds["judge"] = time.perf_counter() - t0

    overfitting = None
    if paths.metrics("03_train").exists():
        overfitting = paths.read_metrics("03_train").get("overfitting")
    seconds["total"] = time.perf_counter() - started
    return {
        **results,
        "reference": reference,
        "deltas": deltas,
        "verdict": verdict(deltas, e.confidence),
        "loss_reduction": 1 - results["tuned"]["loss"] / results["base"]["loss"],
        "forgetting": forgetting,
        "overfitting": overfitting,
        "judge": judge,
        "task": task,
        "test_examples": len(samples["tuned"]["loss"].values),
        "generations": len(sample),
        "few_shot_ids": shot_ids, "few_shot_note": few_shot_note,
        "prompted_system_prompt": e.prompting.system_prompt,
        "confidence": e.confidence,
        "bootstrap_samples": e.bootstrap_samples,
        "stop_token_ids": stop_ids,
        "seconds": seconds,
    }
