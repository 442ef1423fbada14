"""The prompted base model: a system prompt and a seeded choice of few-shot train conversations before
each test prompt."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from ftkit.core.files import iter_jsonl
from ftkit.core.masking import IGNORE_INDEX, build_example, closing_suffix, render


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
