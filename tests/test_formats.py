import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ftkit.core.formats import (
    Detection,
    FormatError,
    Problem,
    detect_format,
    prompt_and_reference,
    to_canonical,
    to_openai,
    to_sharegpt,
    with_system_prompt,
)
from ftkit.core.validation import validate

GOOD = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                     {"role": "assistant", "content": "A"}]}


def canon(record, fmt, columns=None):
    return to_canonical(record, Detection(fmt, "test", columns))


# --- each input format ---------------------------------------------------------------------

def test_messages_passthrough_keeps_weight_name_and_meta():
    rec = {"messages": [{"role": "user", "content": "Q", "name": "ann"},
                        {"role": "assistant", "content": "A", "weight": 0},
                        {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}], "source": "crm"}
    out = canon(rec, "messages")
    assert out["messages"] == rec["messages"] and out["meta"] == {"source": "crm"}
    assert validate(out) == []


def test_sharegpt():
    rec = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                             {"from": "gpt", "value": "A"}], "id": 7}
    assert canon(rec, "sharegpt") == {"messages": GOOD["messages"][:1] + [{"role": "user", "content": "Q"},
                                                                         {"role": "assistant", "content": "A"}],
                                      "meta": {"id": 7}}
    with pytest.raises(FormatError, match=r"conversations\[1\].from: unknown speaker 'robot'"):
        canon({"conversations": [{"from": "human", "value": "Q"}, {"from": "robot", "value": "A"}]}, "sharegpt")


def test_alpaca_with_input_system_and_history():
    rec = {"instruction": "Translate", "input": "hello", "output": "bonjour", "system": "Be exact.",
           "history": [["Hi", "Hello!"]], "category": "mt"}
    out = canon(rec, "alpaca")
    assert out["messages"] == [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": "Hello!"},
                               {"role": "user", "content": "Translate\n\nhello"},
                               {"role": "assistant", "content": "bonjour"}]
    assert out["meta"] == {"category": "mt"}
    assert canon({"instruction": "Hi", "input": "", "output": "Yo"}, "alpaca")["messages"][0]["content"] == "Hi"
    with pytest.raises(FormatError) as e:
        canon({"instruction": 3, "history": "x"}, "alpaca")
    assert [str(p) for p in e.value.problems] == [
        "instruction: must be a string, got int", "output: missing",
        "history: must be a list of [instruction, output] pairs, got str"]


def test_prompt_completion_plain_and_conversational():
    assert canon({"prompt": "2+2?", "completion": "4"}, "prompt_completion")["messages"] == [
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    conv = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]}
    assert canon(conv, "prompt_completion")["messages"] == conv["prompt"] + conv["completion"]


def test_text_and_columns():
    assert canon({"text": "Once upon", "src": "x"}, "text") == {"text": "Once upon", "meta": {"src": "x"}}
    out = canon({"instruction": "Q", "response": "A", "intent": "x"}, "columns",
                {"user": "instruction", "assistant": "response"})
    assert out == {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
                   "meta": {"intent": "x"}}
    with pytest.raises(FormatError, match="response: missing"):
        canon({"instruction": "Q"}, "columns", {"user": "instruction", "assistant": "response"})


# --- detection ------------------------------------------------------------------------------

@pytest.mark.parametrize("record,fmt", [
    ({"messages": []}, "messages"), ({"conversations": []}, "sharegpt"),
    ({"instruction": "a", "input": "", "output": "b"}, "alpaca"), ({"prompt": "a", "completion": "b"}, "prompt_completion"),
    ({"question": "a", "answer": "b"}, "columns"), ({"text": "a"}, "text"),
    ({"instruction": "a", "response": "b", "intent": "c"}, "columns"),
])
def test_detection(record, fmt):
    d = detect_format([record] * 3)
    assert d.format == fmt and "of the first 3 records" in d.reason


def test_detection_explains_failure():
    with pytest.raises(FormatError, match=r"cannot tell the format from the fields \(a, b\); set data.format"):
        detect_format([{"a": 1, "b": 2}])
    with pytest.raises(FormatError, match="column 'resp' is in none of the first 1 records"):
        detect_format([{"q": 1}], {"user": "q", "assistant": "resp"})


# --- validation: one test per rule -----------------------------------------------------------

def codes(record, **kw):
    return [(p.field, p.code) for p in validate(record, **kw)]


def test_validation_rules():
    assert validate(GOOD) == []
    assert codes([]) == [("messages", "missing_field")]
    assert codes({"messages": []}) == [("messages", "empty_content")]
    assert codes({"messages": ["hi"]})[0] == ("messages[0]", "wrong_type")
    assert ("messages[1].role", "unknown_role") in codes({"messages": [{"role": "user", "content": "q"},
                                                                       {"role": "bot", "content": "a"}]})
    assert codes({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "a"}]}) == [
        ("messages[0].content", "empty_content")]
    assert codes({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}) == [
        ("messages[0].content", "wrong_type")]
    assert codes({"messages": [{"role": "user", "content": "q", "foo": 1}, {"role": "assistant", "content": "a"}]}) == [
        ("messages[0]", "unknown_key")]
    assert codes({"messages": [{"role": "user", "content": "q", "weight": 1},
                               {"role": "assistant", "content": "a", "weight": 2}]}) == [
        ("messages[0].weight", "invalid_weight"), ("messages[1].weight", "invalid_weight")]
    order = {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
                          {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}
    assert codes(order) == [("messages[1]", "bad_role_order"), ("messages[2].role", "bad_role_order")]
    assert codes(order, alternate=False) == [("messages[1]", "bad_role_order")]
    assert codes({"messages": [{"role": "user", "content": "q"}]}) == [("messages", "no_assistant")]
    assert codes({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]}) \
        == [("messages", "no_assistant")]
    assert codes({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                               {"role": "user", "content": "again"}]}) == [("messages", "bad_role_order")]
    assert codes(GOOD, max_chars=2) == [("messages", "too_long")]


def test_tool_calls_pass():
    rec = {"messages": [{"role": "user", "content": "weather?"},
                        {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function",
                                                                               "function": {"name": "w", "arguments": "{}"}}]},
                        {"role": "tool", "content": "sunny", "tool_call_id": "1"},
                        {"role": "assistant", "content": "It is sunny."}]}
    assert validate(rec) == []


# --- export and helpers -----------------------------------------------------------------------

def test_exports():
    rec = {"messages": GOOD["messages"], "meta": {"x": 1}}
    assert to_openai(rec) == {"messages": GOOD["messages"]}
    assert to_sharegpt(rec)["conversations"][1] == {"from": "human", "value": "U"}
    assert with_system_prompt(GOOD["messages"][1:], "S") == GOOD["messages"]
    assert with_system_prompt(GOOD["messages"], "other") == GOOD["messages"]
    prompt, ref = prompt_and_reference(GOOD["messages"])
    assert ref == "A" and prompt == GOOD["messages"][:2]


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=5),
                           max_leaves=20)
keys = st.sampled_from(["messages", "conversations", "instruction", "input", "output", "prompt", "completion", "text",
                        "history", "system", "role", "content", "from", "value"])
records = st.dictionaries(keys, json_values, max_size=5) | json_values


@settings(max_examples=300, deadline=None)
@given(records, st.sampled_from(["messages", "sharegpt", "alpaca", "prompt_completion", "text"]))
def test_converter_never_crashes_on_arbitrary_json(record, fmt):
    """Any JSON value: either a canonical record that validate() can judge, or a FormatError."""
    if not isinstance(record, dict):
        return  # the reader rejects non-objects before conversion
    try:
        out = to_canonical(record, Detection(fmt, "test"))
    except FormatError as e:
        assert e.problems and all(isinstance(p, Problem) for p in e.problems)
        return
    problems = validate(out)
    assert all(isinstance(p, Problem) for p in problems)
    json.dumps(out, default=str)
