from ftkit.formats import prompt_and_reference, to_messages, validate

GOOD = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                     {"role": "assistant", "content": "A"}]}


def test_to_messages_adds_system_and_alternates():
    conv = {"conversation_id": "T1", "turns": [{"user": "a", "assistant": "b"}, {"user": "c", "assistant": "d"}]}
    rec = to_messages(conv, "sys")
    assert [m["role"] for m in rec["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in rec["messages"]] == ["sys", "a", "b", "c", "d"]
    assert to_messages(conv, None)["messages"][0] == {"role": "user", "content": "a"}


def test_to_messages_keeps_existing_system():
    rec = to_messages({"conversation_id": "x", "messages": GOOD["messages"]}, "other")
    assert rec["messages"] == GOOD["messages"]


def test_validate_accepts_good_record():
    assert validate(GOOD) == []


def test_validate_reports_each_problem():
    assert validate([]) == ["record must be an object with a 'messages' list"]
    assert validate({"messages": []}) == ["'messages' is empty"]
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}
    probs = validate(bad)
    assert "messages[1].role: unknown role 'bot'; use one of system, user, assistant" in probs
    assert "no assistant message: nothing to train on" in probs
    assert validate({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "a"}]}) == [
        "messages[0].content: empty or whitespace-only user message"]
    assert validate({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}) == [
        "messages[0].content: must be a string, got int"]
    order = validate({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
                                   {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]})
    assert "messages[1]: a system message is only allowed first" in order
    assert "messages[2].role: expected 'assistant' here (user and assistant must alternate), got 'user'" in order
    assert validate({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                  {"role": "user", "content": "c"}]}) == [
        "last message is 'user', not 'assistant': the final turn has no reply to learn"]


def test_prompt_and_reference():
    prompt, ref = prompt_and_reference(GOOD["messages"])
    assert ref == "A" and prompt == GOOD["messages"][:2]
