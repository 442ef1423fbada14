"""Data formats → one canonical chat form, format detection and export (validation: :mod:`ftkit.core.validation`).

The canonical record is ``{"messages": [{"role", "content", ...}], "meta": {...}}`` — OpenAI's
fine-tuning shape, where an assistant message may carry ``weight`` (0 or 1: train on it or not),
``name`` and ``tool_calls`` pass through, and every other input column rides along in ``meta``.
Plain text (completion tuning) is ``{"text": "...", "meta": {...}}``.

Input formats (``data.format``; ``auto`` detects and says why):

==================  ===========================================================================
``messages``        OpenAI chat: ``{"messages": [{"role": "user", "content": "..."}, ...]}``
``sharegpt``        ``{"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}]}``
``alpaca``          ``instruction``, optional ``input``, ``output``, optional ``system``, ``history``
``prompt_completion`` ``prompt`` and ``completion`` (strings, or lists of messages)
``text``            ``text`` only: completion tuning on raw text
``columns``         any table, through ``data.columns`` (e.g. ``{user: instruction, assistant: response}``)
==================  ===========================================================================

Preference data (``openai_dpo``, ``preference``, ``kto``, and tables with ``chosen``/``rejected`` columns):
:mod:`ftkit.core.preference`.

Every problem is a :class:`Problem` naming the field (``messages[2].content``) and the reason.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
PREFERENCE_FORMATS = ("openai_dpo", "preference", "kto")  # read by ftkit.core.preference
FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text", "columns", *PREFERENCE_FORMATS)
MESSAGE_KEYS = {"role", "content", "name", "weight", "tool_calls", "tool_call_id", "function_call"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "system": "system",
                  "function_call": "assistant", "observation": "tool", "tool": "tool"}
# Column pairs that are recognised as (user, assistant) without configuration.
KNOWN_COLUMN_PAIRS = [("instruction", "response"), ("question", "answer"), ("prompt", "response"),
                      ("query", "response"), ("input", "output"), ("ticket", "reply"), ("user", "assistant"),
                      ("request", "response"), ("context", "response")]


@dataclass(frozen=True)
class Problem:
    field: str
    reason: str
    code: str = "invalid"

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}" if self.field else self.reason


class FormatError(ValueError):
    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("; ".join(map(str, problems)))


@dataclass
class Detection:
    format: str
    reason: str
    columns: dict[str, str] | None = None


# ---------------------------------------------------------------------------------------------
# detection


def detect_format(records: Iterable[dict], columns: dict[str, str] | None = None, sample: int = 200) -> Detection:
    """Guess the format from the first ``sample`` readable records; the reason says why."""
    rows = [r for _, r in zip(range(sample), records, strict=False)]
    if not rows:
        raise FormatError([Problem("", "no readable record to detect the format from", "empty")])
    keys = [set(r) for r in rows]

    def share(pred) -> float:
        return sum(1 for k, r in zip(keys, rows, strict=True) if pred(k, r)) / len(rows)

    n = len(rows)
    if columns:
        missing = [c for c in columns.values() if not any(c in k for k in keys)]
        if missing:
            raise FormatError([Problem("data.columns", f"column {missing[0]!r} is in none of the first {n} records; "
                                       f"columns seen: {', '.join(sorted(set().union(*keys)))}", "missing_field")])
        return Detection("columns", f"data.columns maps {_mapping_text(columns)}", dict(columns))
    from ftkit.core.preference import detection_checks

    checks = [*detection_checks(),
        ("messages", lambda k, r: isinstance(r.get("messages"), list), "a 'messages' list (OpenAI chat format)"),
        ("sharegpt", lambda k, r: isinstance(r.get("conversations"), list), "a 'conversations' list (ShareGPT)"),
        ("alpaca", lambda k, r: "instruction" in k and "output" in k, "'instruction' and 'output' fields (Alpaca)"),
        ("prompt_completion", lambda k, r: "prompt" in k and "completion" in k, "'prompt' and 'completion' fields"),
    ]
    for fmt, pred, what in checks:
        s = share(pred)
        if s >= 0.5:
            return Detection(fmt, f"{s:.0%} of the first {n} records have {what}")
    for user, assistant in KNOWN_COLUMN_PAIRS:
        s = share(lambda k, r, u=user, a=assistant: u in k and a in k)
        if s >= 0.5:
            cols = {"user": user, "assistant": assistant}
            if share(lambda k, r: "system" in k) >= 0.5:
                cols["system"] = "system"
            return Detection("columns", f"{s:.0%} of the first {n} records have the columns '{user}' and "
                             f"'{assistant}', read as {_mapping_text(cols)}", cols)
    s = share(lambda k, r: isinstance(r.get("text"), str))
    if s >= 0.5:
        return Detection("text", f"{s:.0%} of the first {n} records have a 'text' field and no chat structure "
                         "(completion tuning)")
    seen = ", ".join(sorted(map(str, set().union(*keys))))[:300]
    hint = ""
    mixed = {fmt: round(share(pred) * n) for fmt, pred, _ in checks if share(pred)}
    as_text = [k for k in ("messages", "conversations") if share(lambda _, r, k=k: isinstance(r.get(k), str))]
    if as_text:  # a list saved as JSON text inside a string: a common export bug
        hint = (f"; '{as_text[0]}' is a string, not a list, in {share(lambda _, r: isinstance(r.get(as_text[0]), str)):.0%}"
                " of them (a list saved as JSON text? write the list itself)")
    elif len(mixed) > 1:
        hint = "; the records mix formats (" + ", ".join(f"{f} {c}" for f, c in mixed.items()) + "): use one per file"
    raise FormatError([Problem("data.format", f"cannot tell the format from the fields ({seen}){hint}; set data.format, "
                               "or data.columns: {user: <column>, assistant: <column>}", "unknown_format")])


def _mapping_text(columns: dict[str, str]) -> str:
    return ", ".join(f"{role} ← '{col}'" for role, col in columns.items())


# ---------------------------------------------------------------------------------------------
# conversion


def to_canonical(record: dict, detection: Detection) -> dict:
    """Convert one record; raises :class:`FormatError` listing every problem with field names."""
    fmt = detection.format
    if fmt == "messages":
        messages = record.get("messages")
        if not isinstance(messages, list):  # no conversation to carry on with (cleaning, grouping need a list)
            from ftkit.core.validation import validate  # here: validation builds on this module's names

            raise FormatError(validate({"messages": messages}))
        meta = {k: v for k, v in record.items() if k != "messages"}
        return {"messages": messages, "meta": meta}
    if fmt == "sharegpt":
        return _from_sharegpt(record)
    if fmt == "alpaca":
        return _from_alpaca(record)
    if fmt == "prompt_completion":
        return _from_prompt_completion(record)
    if fmt == "text":
        text = record.get("text")
        if not isinstance(text, str):
            raise FormatError([Problem("text", f"must be a string, got {type_name(text)}", "wrong_type")])
        return {"text": text, "meta": {k: v for k, v in record.items() if k != "text"}}
    from ftkit.core import preference

    if fmt in PREFERENCE_FORMATS or (fmt == "columns" and preference_columns(detection.columns)):
        return preference.to_canonical(record, fmt, detection.columns)
    if fmt == "columns":
        return _from_columns(record, detection.columns or {})
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def preference_columns(columns: dict | None) -> bool:
    """A columns mapping of preference data: chosen and rejected replies, or a reply with a label (KTO)."""
    return bool(columns) and ({"chosen", "rejected"} <= set(columns) or "label" in columns)


def shorten(v: Any, n: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= n else r[: n - 1] + "…"


def type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _text_field(record: dict, key: str, problems: list[Problem], required: bool = True) -> str | None:
    if key not in record or record[key] is None:
        if required:
            problems.append(Problem(key, "missing", "missing_field"))
        return None
    v = record[key]
    if not isinstance(v, str):
        problems.append(Problem(key, f"must be a string, got {type_name(v)}", "wrong_type"))
        return None
    return v


def _from_sharegpt(record: dict) -> dict:
    conv = record.get("conversations")
    problems: list[Problem] = []
    messages = []
    for i, turn in enumerate(conv if isinstance(conv, list) else []):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            problems.append(Problem(where, f"must be an object with 'from' and 'value', got {type_name(turn)}", "wrong_type"))
            continue
        who = turn.get("from", turn.get("role"))
        role = SHAREGPT_ROLES.get(str(who).lower()) if who is not None else None
        if role is None:
            problems.append(Problem(f"{where}.from", f"unknown speaker {who!r}; use human, gpt or system",
                                    "unknown_role"))
            continue
        messages.append({"role": role, "content": turn.get("value", turn.get("content"))})
    if not isinstance(conv, list):
        problems.append(Problem("conversations", f"must be a list, got {type_name(conv)}", "wrong_type"))
    if problems:
        raise FormatError(problems)
    if isinstance(record.get("system"), str) and record["system"].strip() and (not messages or messages[0]["role"] != "system"):
        messages.insert(0, {"role": "system", "content": record["system"]})
    return {"messages": messages, "meta": {k: v for k, v in record.items() if k not in ("conversations", "system")}}


def _from_alpaca(record: dict) -> dict:
    problems: list[Problem] = []
    instruction = _text_field(record, "instruction", problems)
    inp = _text_field(record, "input", problems, required=False)
    output = _text_field(record, "output", problems)
    system = _text_field(record, "system", problems, required=False)
    history = record.get("history") or []
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    if not isinstance(history, list):
        problems.append(Problem("history", f"must be a list of [instruction, output] pairs, got {type_name(history)}",
                                "wrong_type"))
        history = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            problems.append(Problem(f"history[{i}]", "must be a pair of strings [instruction, output]", "wrong_type"))
            continue
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    if problems:
        raise FormatError(problems)
    user = instruction if not (inp and inp.strip()) else f"{instruction}\n\n{inp}"
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    meta = {k: v for k, v in record.items() if k not in ("instruction", "input", "output", "system", "history")}
    return {"messages": messages, "meta": meta}


def _from_prompt_completion(record: dict) -> dict:
    prompt, completion = record.get("prompt"), record.get("completion")
    meta = {k: v for k, v in record.items() if k not in ("prompt", "completion")}
    if isinstance(prompt, list) and isinstance(completion, list):  # conversational prompt-completion (TRL)
        return {"messages": prompt + completion, "meta": meta}
    problems: list[Problem] = []
    p = _text_field(record, "prompt", problems)
    c = _text_field(record, "completion", problems)
    if problems:
        raise FormatError(problems)
    return {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}], "meta": meta}


def _from_columns(record: dict, columns: dict[str, str]) -> dict:
    problems: list[Problem] = []
    messages = []
    for role in ("system", "user", "assistant"):
        col = columns.get(role)
        if not col:
            continue
        v = _text_field(record, col, problems, required=role != "system")
        if v is not None and (role != "system" or v.strip()):
            messages.append({"role": role, "content": v})
    if problems:
        raise FormatError(problems)
    used = set(columns.values())
    return {"messages": messages, "meta": {k: v for k, v in record.items() if k not in used}}


# ---------------------------------------------------------------------------------------------
# helpers and export


def prompt_and_reference(messages: list[dict]) -> tuple[list[dict], str]:
    """Split a conversation into the prompt (all but the last reply) and the last assistant reply."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("conversation must end with an assistant message")
    return messages[:-1], messages[-1]["content"]


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and not (messages and messages[0].get("role") == "system"):
        return [{"role": "system", "content": system_prompt}] + messages
    return messages


def to_openai(record: dict) -> dict:
    """OpenAI fine-tuning JSONL line: only ``messages`` with the keys OpenAI accepts; a preference pair as
    OpenAI's DPO line (``input.messages``, ``preferred_output``, ``non_preferred_output``)."""
    keep = ("role", "content", "name", "weight", "tool_calls", "tool_call_id")
    messages = [{k: m[k] for k in keep if k in m} for m in record["messages"]]
    if isinstance(record.get("rejected"), dict):
        return {"input": {"messages": messages[:-1]}, "preferred_output": [messages[-1]],
                "non_preferred_output": [{"role": "assistant", "content": record["rejected"]["content"]}]}
    return {"messages": messages}


def to_sharegpt(record: dict) -> dict:
    back = {"user": "human", "assistant": "gpt", "system": "system", "tool": "observation"}
    return {"conversations": [{"from": back[m["role"]], "value": m["content"]} for m in record["messages"]],
            **({"meta": record["meta"]} if record.get("meta") else {})}


def canonical_text(record: dict) -> str:
    """All content of a record as one string (for duplicate detection)."""
    if "text" in record:
        return record["text"]
    rejected = record.get("rejected")
    if isinstance(rejected, dict):  # pairs differ by their rejected reply too: not duplicates of each other
        return canonical_text({**record, "rejected": None}) + f"\nrejected: {rejected.get('content')}"
    if isinstance(record.get("label"), bool):
        return canonical_text({k: v for k, v in record.items() if k != "label"}) + f"\nlabel: {record['label']}"
    return "\n".join(f"{m.get('role')}: {m.get('content') or json.dumps(m.get('tool_calls'), default=str)}"
                     if isinstance(m, dict) else json.dumps(m, default=str) for m in record["messages"])
