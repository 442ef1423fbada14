"""Optional LLM-as-judge for stage 04: pairwise preference, each pair judged in both orders.

A judge sees the user's message, the reference reply (as guidance) and two candidate replies
labelled A and B, and names the better one. Judges prefer one position more often than chance
(position bias), so every pair is judged twice with the candidates swapped: a candidate wins only
when the judge picks it in both orders; a split decision is a tie. The win rate counts ties as
half a win, with a bootstrap interval over prompts.

Two judges: :class:`LocalJudge` (any causal LM loaded with transformers; compares the next-token
probabilities of "A" and "B", so it needs no parsing) and :class:`EndpointJudge` (any
OpenAI-compatible chat endpoint through the official ``openai`` client, at temperature 0).
"""

from __future__ import annotations

import os
import re
from typing import Protocol

import torch

from ftkit.evaluate.metrics import Sample, bootstrap_ci

INSTRUCTIONS = (
    "You are judging two replies to the same user message. Decide which reply answers the user better: "
    "correct, helpful, in the expected style, and no longer than needed. The reference reply shows what a "
    "good answer looks like. Answer with a single letter: A or B."
)


def judge_messages(prompt: str, reference: str, reply_a: str, reply_b: str) -> list[dict]:
    body = (f"User message:\n{prompt}\n\nReference reply:\n{reference}\n\n"
            f"Reply A:\n{reply_a}\n\nReply B:\n{reply_b}\n\nWhich reply is better? Answer A or B.")
    return [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": body}]


class Judge(Protocol):
    def choose(self, prompt: str, reference: str, reply_a: str, reply_b: str) -> str:
        """'A', 'B', or '?' when the judge's answer names neither."""


class LocalJudge:
    """A transformers causal LM as judge: the more probable next token of "A" and "B" after the question."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.ids = [tokenizer.encode(x, add_special_tokens=False)[0] for x in ("A", "B")]

    @torch.no_grad()
    def choose(self, prompt: str, reference: str, reply_a: str, reply_b: str) -> str:
        from ftkit.core.masking import encode_prompt

        ids = encode_prompt(self.tokenizer, judge_messages(prompt, reference, reply_a, reply_b))
        device = next(self.model.parameters()).device
        logits = self.model(input_ids=torch.tensor([ids], device=device)).logits[0, -1]
        a, b = logits[self.ids[0]].item(), logits[self.ids[1]].item()
        return "A" if a > b else "B" if b > a else "?"


class EndpointJudge:
    """A chat model behind an OpenAI-compatible endpoint (a local server or a hosted API)."""

    _LETTER = re.compile(r"\b([AB])\b")

    def __init__(self, base_url: str, model: str, api_key: str | None = None):
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key=api_key or "not-needed", max_retries=2, timeout=120)
        self.model = model

    def choose(self, prompt: str, reference: str, reply_a: str, reply_b: str) -> str:
        resp = self.client.chat.completions.create(
            model=self.model, messages=judge_messages(prompt, reference, reply_a, reply_b), max_tokens=4,
            temperature=0,
        )
        found = self._LETTER.search(resp.choices[0].message.content or "")
        return found.group(1) if found else "?"


def compare(judge: Judge, items: list[dict], *, resamples: int = 1000, confidence: float = 0.95,
            seed: int = 0) -> dict:
    """Judge ``first`` against ``second`` for each item ({prompt, reference, first, second}) in both orders.

    Returns the first candidate's win rate (ties count half) with a bootstrap interval, the
    counts, and how often the judge agreed with itself across the two orders.
    """
    rows = []
    for it in items:
        forward = judge.choose(it["prompt"], it["reference"], it["first"], it["second"])  # first is A
        swapped = judge.choose(it["prompt"], it["reference"], it["second"], it["first"])  # first is B
        if forward == "A" and swapped == "B":
            outcome, score = "win", 1.0
        elif forward == "B" and swapped == "A":
            outcome, score = "loss", 0.0
        else:
            outcome, score = "tie", 0.5
        rows.append({"forward": forward, "swapped": swapped, "outcome": outcome, "score": score})
    n = len(rows)
    ci = bootstrap_ci(Sample.of([r["score"] for r in rows]), resamples=resamples, confidence=confidence, seed=seed)
    return {
        "pairs": n,
        "wins": sum(r["outcome"] == "win" for r in rows),
        "losses": sum(r["outcome"] == "loss" for r in rows),
        "ties": sum(r["outcome"] == "tie" for r in rows),
        "win_rate": ci["value"], "ci_low": ci["ci_low"], "ci_high": ci["ci_high"],
        "order_consistency": sum(r["outcome"] != "tie" for r in rows) / max(n, 1),
        "verdicts": rows,
    }


def build_judge(cfg) -> Judge:
    """The judge ``evaluate.judge`` names: an OpenAI-compatible endpoint, or a local model."""
    j = cfg.evaluate.judge
    if j.base_url:
        return EndpointJudge(j.base_url, j.model or "default", os.environ.get(j.api_key_env))
    from ftkit.core.modeling import load_model, load_tokenizer, resolve_model_path

    path = resolve_model_path(j.model)
    return LocalJudge(load_model(path, cfg.model), load_tokenizer(path, cfg.model))
