"""Validation of canonical records: every problem of a record, each naming the field and the reason.

A superset of OpenAI's fine-tuning checks; :mod:`ftkit.core.formats` turns any input format into the
canonical form this judges."""

from __future__ import annotations

import json
from typing import Any

from ftkit.core.formats import MESSAGE_KEYS, ROLES, Problem, shorten, type_name


def validate(record: Any, *, alternate: bool = True, max_chars: int | None = None) -> list[Problem]:
    """Every problem of one canonical record (empty list: valid); a superset of OpenAI's checks.

    Checks: a ``messages`` list of objects; known roles; string, non-empty content without NUL
    characters (an assistant message with ``tool_calls`` may have null content); ``tool_calls`` on
    assistant messages only, each a function with a name and arguments that are a JSON object; no
    unknown message keys; ``weight`` 0 or 1 on assistant messages only; a system message only
    first; with ``alternate``, user and assistant alternating (tool results after an assistant tool
    call); at least one assistant message with weight 1; the last message from the assistant; total
    characters under ``max_chars``.
    """
    if isinstance(record, dict) and "text" in record and "messages" not in record:
        t = record["text"]
        if not isinstance(t, str):
            return [Problem("text", f"must be a string, got {type_name(t)}", "wrong_type")]
        if not t.strip():
            return [Problem("text", "empty or whitespace only", "empty_content")]
        if max_chars and len(t) > max_chars:
            return [Problem("text", f"{len(t):,} characters > {max_chars:,}", "too_long")]
        if "\x00" in t:
            return [Problem("text", f"contains a NUL character (\\u0000) at position {t.index(chr(0))}: binary data "
                            "in the export? remove it", "control_char")]
        return []
    if isinstance(record, dict) and record.get("messages") is not None and not isinstance(record["messages"], list):
        m = record["messages"]
        hint = " (a list saved as JSON text? write the list itself)" if isinstance(m, str) and m.lstrip()[:1] == "[" else ""
        return [Problem("messages", f"must be a list of {{role, content}} objects, got {type_name(m)}{hint}", "wrong_type")]
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        return [Problem("messages", "record must be an object with a 'messages' list", "missing_field")]
    messages = record["messages"]
    if not messages:
        return [Problem("messages", "is empty", "empty_content")]
    problems: list[Problem] = []
    prev = None
    total = 0
    order_known = True  # after an unknown role, the turn order cannot be judged (it would only echo that)
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            problems.append(Problem(where, f"must be an object with 'role' and 'content', got {type_name(m)}", "wrong_type"))
            continue
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            problems.append(Problem(f"{where}.role", f"unknown role {shorten(role)}; use one of {', '.join(ROLES)}",
                                    "unknown_role"))
            order_known = False
            continue
        extra = set(m) - MESSAGE_KEYS
        if extra:
            problems.append(Problem(where, f"unknown key(s) {', '.join(sorted(map(str, extra)))}", "unknown_key"))
        if m.get("tool_calls") not in (None, []):  # null or [] (API logs write them on every reply): no calls
            problems += _tool_call_problems(where, role, m["tool_calls"])
        if content is None and role == "assistant" and m.get("tool_calls"):
            pass
        elif not isinstance(content, str):
            problems.append(Problem(f"{where}.content", f"must be a string, got {type_name(content)}", "wrong_type"))
        elif not content.strip():
            problems.append(Problem(f"{where}.content", f"empty or whitespace-only {role} message", "empty_content"))
        else:
            total += len(content)
            if "\x00" in content:  # no chat holds NUL: binary data, or UTF-16 read as something else
                problems.append(Problem(f"{where}.content", f"contains a NUL character (\\u0000) at position "
                                        f"{content.index(chr(0))}: binary data in the export? remove it", "control_char"))
        if "weight" in m and (role != "assistant" or m["weight"] not in (0, 1) or isinstance(m["weight"], bool)):
            got = shorten(m["weight"], 40) if role == "assistant" else f"on a {shorten(role, 20)} message"
            problems.append(Problem(f"{where}.weight", "weight is allowed on assistant messages only, as 0 or 1, got "
                                    f"{got}", "invalid_weight"))
        if role == "system":
            if i != 0:
                problems.append(Problem(where, "a system message is only allowed first", "bad_role_order"))
        elif alternate and order_known:
            expected = _expected_roles(prev)
            if role not in expected:
                problems.append(Problem(f"{where}.role", f"expected {' or '.join(expected)} after "
                                        f"{prev or 'the start'}, got '{role}' (user and assistant must alternate)",
                                        "bad_role_order"))
        if role != "system":
            prev = role
    if any(p.code == "unknown_role" or (p.code == "wrong_type" and p.field.endswith("]")) for p in problems):
        return problems  # the conversation's shape cannot be judged; later checks would only echo this
    roles = [m.get("role") for m in messages if isinstance(m, dict)]
    trained = [m for m in messages if isinstance(m, dict) and m.get("role") == "assistant" and m.get("weight", 1) != 0]
    if "assistant" not in roles:
        problems.append(Problem("messages", "no assistant message: nothing to train on", "no_assistant"))
    elif not trained:
        problems.append(Problem("messages", "every assistant message has weight 0: nothing to train on",
                                "no_assistant"))
    elif roles[-1] != "assistant":
        problems.append(Problem("messages", f"last message is '{roles[-1]}', not 'assistant': the final turn has no "
                                "reply to learn", "bad_role_order"))
    if max_chars and total > max_chars:
        problems.append(Problem("messages", f"{total:,} characters > {max_chars:,}", "too_long"))
    if not problems:
        from ftkit.core.preference import validate_pair

        problems += validate_pair(record)
    return problems


def _tool_call_problems(where: str, role: Any, calls: Any) -> list[Problem]:
    """``tool_calls``: on an assistant message, a list of ``{"function": {"name", "arguments"}}`` whose
    arguments are a JSON object (as a JSON string, OpenAI's form, or the object itself)."""
    field = f"{where}.tool_calls"
    if role != "assistant":
        return [Problem(field, f"tool_calls are allowed on assistant messages only, not {shorten(role, 20)}", "invalid_tool_call")]
    if not isinstance(calls, list) or not calls:
        return [Problem(field, f"must be a list of calls, got {type_name(calls)}", "invalid_tool_call")]
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            out.append(Problem(f"{field}[{j}]", "must be an object with a 'function' object holding 'name' and "
                               "'arguments'", "invalid_tool_call"))
            continue
        if not isinstance(fn.get("name"), str) or not fn["name"].strip():
            out.append(Problem(f"{field}[{j}].function.name", f"must be a non-empty string, got {type_name(fn.get('name'))}",
                               "invalid_tool_call"))
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except (ValueError, RecursionError) as e:
                out.append(Problem(f"{field}[{j}].function.arguments", f"is not valid JSON ({str(e)[:80]}); write the "
                                   "arguments as a JSON object in a string, e.g. '{\"city\": \"Oslo\"}'",
                                   "invalid_tool_call"))
                continue
        if not isinstance(args, dict):
            out.append(Problem(f"{field}[{j}].function.arguments", f"must be a JSON object (or a string of one), got "
                               f"{type_name(args)}", "invalid_tool_call"))
    return out


def _expected_roles(prev: str | None) -> tuple[str, ...]:
    return {None: ("user",), "user": ("assistant",), "assistant": ("user", "tool"), "tool": ("assistant", "tool")}[prev]
