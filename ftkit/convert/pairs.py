"""Stage 02 for preference records: the chosen and the rejected conversation each rendered, masked and
verified as any conversation is (:func:`ftkit.convert.conversion.process_record`), then cut where the
last reply starts into ``prompt_ids`` + ``chosen_ids`` / ``rejected_ids`` — the form TRL's preference
trainers take. Both replies end with the template's end-of-turn token (trained: the model must learn
to stop in the preferred way too); what follows it (a template's newline) is not part of a reply.

A pair is never truncated: cutting one side's history could make the two answer different prompts, so
an over-long pair is quarantined (or stops the run with ``convert.over_length: error``), counted like
any other record.
"""

from __future__ import annotations

from ftkit.core.masking import IGNORE_INDEX


def last_reply(input_ids: list[int], labels: list[int]) -> tuple[int, int] | None:
    """(start, end) of the last trained run of tokens: the final reply with its end-of-turn token."""
    end = max((i for i, label in enumerate(labels) if label != IGNORE_INDEX), default=None)
    if end is None:
        return None
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start, end + 1


def process_preference(tokenizer, rec: dict, process_record, **kw) -> dict:
    """One pair or KTO record → ``{"ok": True, "chat", "tokens", ...}`` as :func:`process_record` returns, the
    token row extended with ``prompt_ids`` and ``chosen_ids``/``rejected_ids`` (pairs) or ``completion_ids``
    and ``label`` (KTO); or ``{"ok": False, "code", "reason"}``."""
    kw = {**kw, "over_length": "error" if kw.get("over_length") == "error" else "drop"}
    base = {k: v for k, v in rec.items() if k not in ("rejected", "label")}
    chosen = process_record(tokenizer, base, **kw)
    if not chosen["ok"]:
        return chosen
    if chosen.get("per_reply") or len(chosen["tokens"]) != 1:
        return {"ok": False, "code": "template_error",
                "reason": "the chat template rewrites earlier turns: a preference record must be one example"}
    row = chosen["tokens"][0]
    cut = last_reply(row["input_ids"], row["labels"])
    if cut is None:
        return {"ok": False, "code": "no_trained_tokens", "reason": "the chosen reply carries no trained token"}
    prompt_ids, chosen_ids = row["input_ids"][:cut[0]], row["input_ids"][cut[0]:cut[1]]
    if "label" in rec:  # KTO: one reply, good or bad
        return {**chosen, "chat": {**chosen["chat"], "label": rec["label"]},
                "tokens": [{**row, "prompt_ids": prompt_ids, "completion_ids": chosen_ids, "label": rec["label"]}]}
    other = process_record(tokenizer, {**base, "messages": rec["messages"][:-1] + [rec["rejected"]]}, **kw)
    if not other["ok"]:
        return {**other, "reason": f"rejected reply: {other['reason']}"}
    r = other["tokens"][0]
    rcut = last_reply(r["input_ids"], r["labels"])
    if rcut is None or r["input_ids"][:rcut[0]] != prompt_ids:
        return {"ok": False, "code": "prompt_mismatch",
                "reason": "the chosen and rejected conversations render different prompts with this chat template"}
    return {**chosen, "chat": {**chosen["chat"], "rejected": rec["rejected"]},
            "tokens": [{**row, "prompt_ids": prompt_ids, "chosen_ids": chosen_ids,
                        "rejected_ids": r["input_ids"][rcut[0]:rcut[1]]}]}


def pair_metrics(token_rows: list[dict]) -> dict:
    """Counts and lengths of a split's pairs, with the chosen/rejected length ratio: DPO rewards whatever
    separates chosen from rejected, and a length gap is the easiest thing to learn (length bias)."""
    import numpy as np

    pairs = [r for r in token_rows if "rejected_ids" in r]
    kto = [r for r in token_rows if "completion_ids" in r]
    out: dict = {"pairs": len(pairs), "kto_records": len(kto)}
    if pairs:
        c = np.array([len(r["chosen_ids"]) for r in pairs], dtype=float)
        rj = np.array([len(r["rejected_ids"]) for r in pairs], dtype=float)
        out.update({"chosen_tokens_mean": float(c.mean()), "rejected_tokens_mean": float(rj.mean()),
                    "prompt_tokens_mean": float(np.mean([len(r["prompt_ids"]) for r in pairs])),
                    "length_ratio_mean": float(np.mean(c / np.maximum(rj, 1))),
                    "chosen_longer_share": float(np.mean(c > rj))})
    if kto:
        out["kto_desirable_share"] = float(np.mean([bool(r["label"]) for r in kto]))
    return out
