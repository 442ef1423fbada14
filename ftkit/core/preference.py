"""Preference data → the canonical chat form, with the rejected reply (pairs) or a label (KTO) beside it.

A canonical **pair** is ``{"messages": prompt + [chosen], "rejected": {"role": "assistant", "content": ...},
"meta": {...}}`` and a canonical **KTO record** ``{"messages": prompt + [completion], "label": true|false,
"meta": {...}}``. The chosen reply sits where a demonstration's reply sits, so every chat check, the
cleaning, the chat template, supervised training on the chosen replies and the evaluation's reference
reply work on preference data unchanged; only the rejected reply (or the label) is added.

Formats (``data.format``; ``auto`` detects them):

==================  ===========================================================================
``openai_dpo``      OpenAI's DPO JSONL: ``input.messages``, ``preferred_output``, ``non_preferred_output``
``preference``      ``chosen`` and ``rejected`` (strings or messages) with the prompt from ``prompt``
                    (TRL's explicit prompt), ``conversations`` (LLaMA-Factory's ShareGPT layout),
                    ``instruction``/``input`` (LLaMA-Factory's Alpaca layout), ``messages``, or
                    implicit: chosen and rejected are whole conversations sharing every turn but the last
``kto``             unpaired: ``label`` (true: a good reply) with ``prompt``/``completion`` (TRL) or
                    ``messages`` (LLaMA-Factory's KTO demo; set ``data.format: kto`` for that layout)
``columns``         tables through ``data.columns`` with ``chosen`` and ``rejected`` (or ``assistant``
                    and ``label``) beside ``user``
==================  ===========================================================================
"""

from __future__ import annotations

from ftkit.core.formats import SHAREGPT_ROLES, FormatError, Problem, type_name

_TRUE = {"true", "1", "yes", "good", "thumbs_up", "up"}
_FALSE = {"false", "0", "no", "bad", "thumbs_down", "down"}


def is_pair(record: dict) -> bool:
    return isinstance(record, dict) and "rejected" in record


def is_kto(record: dict) -> bool:
    return isinstance(record, dict) and "label" in record and "rejected" not in record


def is_preference(record: dict) -> bool:
    """A canonical pair or KTO record (not a demonstration)."""
    return is_pair(record) or is_kto(record)


def step_tokens(row: dict) -> int:
    """Tokens a stage-02 row puts through the model in one training step: its sequence; a pair's two
    sequences (each padded to the longer, as TRL batches them); a labelled reply's prompt and reply."""
    if "input_ids" in row and "prompt_ids" not in row:
        return len(row["input_ids"])
    if "rejected_ids" in row:
        return 2 * (len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"])))
    return len(row["prompt_ids"]) + len(row["completion_ids"])


def reference_time_factor(objective: str) -> float:
    """DPO and KTO also run every sequence through the reference, forward only: 4/3 of the trained passes'
    time (no activations kept); ORPO and supervised objectives have no reference."""
    return 4 / 3 if objective in ("dpo", "kto") else 1.0


def detection_checks() -> list[tuple]:
    """(format, predicate(keys, record), what) for :func:`ftkit.core.formats.detect_format`, tried before
    the demonstration formats (a pair file also has ``prompt`` or ``conversations``)."""
    return [
        ("openai_dpo", lambda k, r: isinstance(r.get("input"), dict) and "preferred_output" in k,
         "'input', 'preferred_output' and 'non_preferred_output' (OpenAI DPO)"),
        ("preference", lambda k, r: "chosen" in k and "rejected" in k, "'chosen' and 'rejected' fields (preference pairs)"),
        ("kto", lambda k, r: "completion" in k and isinstance(r.get("label"), bool),
         "'prompt', 'completion' and a true/false 'label' (unpaired preferences, KTO)"),
    ]


def _reply(value, where: str, problems: list[Problem]) -> dict | None:
    """One assistant reply from a string, a message, a one-message list or a ShareGPT turn."""
    if isinstance(value, list):
        if len(value) != 1:
            problems.append(Problem(where, f"must hold exactly one assistant message, got {len(value)}", "wrong_type"))
            return None
        value = value[0]
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    if isinstance(value, dict):
        content = value.get("content", value.get("value"))
        role = value.get("role", value.get("from", "assistant"))
        if str(role).lower() not in ("assistant", "gpt", "model"):
            problems.append(Problem(f"{where}.role", f"must be the assistant's reply, got role {role!r}", "unknown_role"))
            return None
        if not isinstance(content, str):
            problems.append(Problem(f"{where}.content", f"must be a string, got {type_name(content)}", "wrong_type"))
            return None
        return {"role": "assistant", "content": content}
    problems.append(Problem(where, f"must be a string or an assistant message, got {type_name(value)}", "wrong_type"))
    return None


def _prompt(record: dict, problems: list[Problem]) -> list[dict] | None:
    """The conversation before the reply, from whichever prompt layout the record uses (None: implicit)."""
    if "prompt" in record:
        p = record["prompt"]
        if isinstance(p, str):
            return [{"role": "user", "content": p}]
        if isinstance(p, list) and all(isinstance(m, dict) for m in p):
            return [dict(m) for m in p]
        problems.append(Problem("prompt", f"must be a string or a list of messages, got {type_name(p)}", "wrong_type"))
        return []
    if isinstance(record.get("conversations"), list):  # LLaMA-Factory's ShareGPT layout
        out = []
        for i, turn in enumerate(record["conversations"]):
            who = turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
            role = SHAREGPT_ROLES.get(str(who).lower()) if who is not None else None
            if role is None:
                problems.append(Problem(f"conversations[{i}].from", f"unknown speaker {who!r}", "unknown_role"))
                continue
            out.append({"role": role, "content": turn.get("value", turn.get("content"))})
        if isinstance(record.get("system"), str) and record["system"].strip():
            out.insert(0, {"role": "system", "content": record["system"]})
        return out
    if "instruction" in record:  # LLaMA-Factory's Alpaca layout
        ins, inp = record.get("instruction"), record.get("input")
        if not isinstance(ins, str):
            problems.append(Problem("instruction", f"must be a string, got {type_name(ins)}", "wrong_type"))
            return []
        out = [{"role": "system", "content": record["system"]}] if isinstance(record.get("system"), str) and \
            record["system"].strip() else []
        return out + [{"role": "user", "content": ins if not (isinstance(inp, str) and inp.strip()) else f"{ins}\n\n{inp}"}]
    if isinstance(record.get("messages"), list):
        return [dict(m) if isinstance(m, dict) else m for m in record["messages"]]
    return None


def _implicit(chosen, rejected, problems: list[Problem]) -> tuple[list[dict], dict, dict] | None:
    """TRL's implicit prompt: chosen and rejected are whole conversations that differ in the last reply only."""
    if not (isinstance(chosen, list) and isinstance(rejected, list) and chosen and rejected):
        problems.append(Problem("prompt", "missing: give 'prompt', or 'chosen' and 'rejected' as whole conversations "
                                "(lists of messages) that share every turn but the last", "missing_field"))
        return None
    if chosen[:-1] != rejected[:-1]:
        turn = next(i for i, (a, b) in enumerate(zip(chosen[:-1] + [None], rejected[:-1] + [None], strict=False)) if a != b)
        problems.append(Problem(f"rejected[{turn}]", "chosen and rejected differ before their last reply: a pair "
                                "must answer the same prompt", "prompt_mismatch"))
        return None
    c, r = _reply(chosen[-1], "chosen[-1]", problems), _reply(rejected[-1], "rejected[-1]", problems)
    return ([dict(m) for m in chosen[:-1]], c, r) if c and r else None


def _label(v, problems: list[Problem]) -> bool | None:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
        return v.strip().lower() in _TRUE
    problems.append(Problem("label", f"must be true (a good reply) or false (a bad one), got {v!r}", "wrong_type"))
    return None


def _meta(record: dict, used: tuple[str, ...]) -> dict:
    return {k: v for k, v in record.items() if k not in used}


def to_canonical(record: dict, fmt: str, columns: dict | None = None) -> dict:
    """One preference record in the canonical form; raises :class:`FormatError` naming every problem."""
    problems: list[Problem] = []
    if fmt == "openai_dpo":
        inp = record.get("input")
        messages = inp.get("messages") if isinstance(inp, dict) else None
        if not isinstance(messages, list):
            problems.append(Problem("input.messages", f"must be a list of messages, got {type_name(messages)}",
                                    "missing_field" if messages is None else "wrong_type"))
        c = _reply(record.get("preferred_output"), "preferred_output", problems)
        r = _reply(record.get("non_preferred_output"), "non_preferred_output", problems)
        if problems:
            raise FormatError(problems)
        extra = {k: v for k, v in inp.items() if k != "messages"}  # tools, parallel_tool_calls
        return {"messages": [dict(m) for m in messages] + [c], "rejected": r,
                "meta": {**_meta(record, ("input", "preferred_output", "non_preferred_output")), **extra}}
    if fmt == "preference":
        prompt = _prompt(record, problems)
        if prompt is None:
            implicit = _implicit(record.get("chosen"), record.get("rejected"), problems)
            if implicit is None:
                raise FormatError(problems)
            prompt, c, r = implicit
        else:
            c, r = _reply(record.get("chosen"), "chosen", problems), _reply(record.get("rejected"), "rejected", problems)
        if problems:
            raise FormatError(problems)
        used = ("prompt", "conversations", "instruction", "input", "system", "messages", "chosen", "rejected")
        return {"messages": prompt + [c], "rejected": r, "meta": _meta(record, used)}
    if fmt == "kto":
        prompt = _prompt(record, problems)
        label = _label(record.get("label"), problems)
        if "completion" in record:
            reply = _reply(record["completion"], "completion", problems)
            messages = (prompt or []) + ([reply] if reply else [])
        else:
            messages = prompt or []
            if not messages:
                problems.append(Problem("completion", "missing: give 'prompt' and 'completion', or 'messages' ending "
                                        "with the assistant's reply", "missing_field"))
        if problems:
            raise FormatError(problems)
        used = ("prompt", "conversations", "instruction", "input", "system", "messages", "completion", "label")
        return {"messages": messages, "label": label, "meta": _meta(record, used)}
    if fmt == "columns":
        return _from_columns(record, columns or {})
    raise ValueError(f"not a preference format: {fmt!r}")


def _from_columns(record: dict, columns: dict) -> dict:
    problems: list[Problem] = []

    def text(role: str, required: bool = True) -> str | None:
        col = columns.get(role)
        v = record.get(col) if col else None
        if v is None or (role == "system" and isinstance(v, str) and not v.strip()):
            if required:
                problems.append(Problem(col or role, "missing", "missing_field"))
            return None
        if not isinstance(v, str):
            problems.append(Problem(col, f"must be a string, got {type_name(v)}", "wrong_type"))
            return None
        return v

    system, user = text("system", required=False), text("user")
    prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    used = tuple(columns.values())
    if "label" in columns:
        reply, label = text("assistant"), _label(record.get(columns["label"]), problems)
        if problems:
            raise FormatError(problems)
        return {"messages": prompt + [{"role": "assistant", "content": reply}], "label": label, "meta": _meta(record, used)}
    chosen, rejected = text("chosen"), text("rejected")
    if problems:
        raise FormatError(problems)
    return {"messages": prompt + [{"role": "assistant", "content": chosen}],
            "rejected": {"role": "assistant", "content": rejected}, "meta": _meta(record, used)}


def validate_pair(record: dict) -> list[Problem]:
    """What the chat checks cannot see: the rejected reply is a non-empty string that differs from the chosen."""
    if is_kto(record):
        return [] if isinstance(record["label"], bool) else [Problem("label", "must be true or false", "wrong_type")]
    if not is_pair(record):
        return []
    r = record["rejected"]
    content = r.get("content") if isinstance(r, dict) else None
    if not isinstance(content, str) or not content.strip():
        return [Problem("rejected", "empty or not a string: a pair needs a rejected reply", "empty_content")]
    chosen = record["messages"][-1].get("content") if record.get("messages") else None
    if isinstance(chosen, str) and " ".join(chosen.split()) == " ".join(content.split()):
        return [Problem("rejected", "the same text as the chosen reply: the pair teaches nothing (remove it, or "
                        "fix the export that copied one into the other)", "same_reply")]
    return []


def prompt_key(record: dict) -> str:
    """The prompt a pair answers (every message but the last), for keeping a prompt's pairs in one split."""
    import json

    return json.dumps(record.get("messages", [])[:-1], sort_keys=True, default=str)
