"""Stage 02, part one: conversations → chat ``messages`` records, and their validation.

The canonical record is OpenAI's fine-tuning shape, ``{"messages": [{"role", "content"}, ...]}``.
Validation follows OpenAI's data-prep checks (and a little more) and says, for every problem,
which record, which message, which field, and why.
"""

from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant")


def to_messages(conversation: dict, system_prompt: str | None) -> dict:
    """Turn one stage-01 conversation into a ``messages`` record.

    >>> to_messages({"conversation_id": "T1", "turns": [{"user": "Hi", "assistant": "Hello"}]}, "Be brief.")
    {'conversation_id': 'T1', 'messages': [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'}]}
    """
    if "messages" in conversation:
        messages = list(conversation["messages"])
        has_system = bool(messages) and isinstance(messages[0], dict) and messages[0].get("role") == "system"
    else:
        messages = []
        for t in conversation["turns"]:
            messages += [{"role": "user", "content": t["user"]}, {"role": "assistant", "content": t["assistant"]}]
        has_system = False
    if system_prompt and not has_system:
        messages = [{"role": "system", "content": system_prompt}] + messages
    return {"conversation_id": conversation["conversation_id"], "messages": messages}


def validate(record: Any) -> list[str]:
    """Return every problem of one ``messages`` record (empty list: valid).

    Checks: a dict with a ``messages`` list; each message a dict with a known ``role`` and
    non-empty string ``content``; a system message only first; user and assistant alternating
    after it, starting with user; at least one assistant message, the last message included.
    """
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        return ["record must be an object with a 'messages' list"]
    messages = record["messages"]
    if not messages:
        return ["'messages' is empty"]
    problems = []
    expected = "user"
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            problems.append(f"{where}: must be an object with 'role' and 'content', got {type(m).__name__}")
            continue
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            problems.append(f"{where}.role: unknown role {role!r}; use one of {', '.join(ROLES)}")
            continue
        if not isinstance(content, str):
            problems.append(f"{where}.content: must be a string, got {type(content).__name__}")
        elif not content.strip():
            problems.append(f"{where}.content: empty or whitespace-only {role} message")
        if role == "system":
            if i != 0:
                problems.append(f"{where}: a system message is only allowed first")
            continue
        if role != expected:
            problems.append(f"{where}.role: expected '{expected}' here (user and assistant must alternate), got '{role}'")
        expected = "assistant" if role == "user" else "user"
    roles = [m.get("role") for m in messages if isinstance(m, dict)]
    if "assistant" not in roles:
        problems.append("no assistant message: nothing to train on")
    elif roles[-1] != "assistant":
        problems.append(f"last message is '{roles[-1]}', not 'assistant': the final turn has no reply to learn")
    return problems


def prompt_and_reference(messages: list[dict]) -> tuple[list[dict], str]:
    """Split a conversation into the prompt (all but the last reply) and the last assistant reply."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("conversation must end with an assistant message")
    return messages[:-1], messages[-1]["content"]
