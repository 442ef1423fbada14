import pytest

from ftkit.core.masking import IGNORE_INDEX, TemplateError, build_example, end_of_turn_token_id, trained_text

CONV = [
    {"role": "system", "content": "You are AcmeCorp support."},
    {"role": "user", "content": "Where is order AC-123456?"},
    {"role": "assistant", "content": "Order AC-123456 ships today.\n— AcmeCorp Support"},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]


def test_masks_decode_to_assistant_text_with_end_of_turn(tokenizer):
    ex = build_example(tokenizer, CONV)
    assert trained_text(tokenizer, ex) == (
        "Order AC-123456 ships today.\n— AcmeCorp Support<|im_end|>You're welcome.<|im_end|>")
    assert len(ex.input_ids) == len(ex.labels)
    assert ex.labels[0] == IGNORE_INDEX


def test_end_of_turn_is_trained_and_pad_differs(tokenizer):
    eot = end_of_turn_token_id(tokenizer)
    assert tokenizer.convert_ids_to_tokens(eot) == "<|im_end|>"
    ex = build_example(tokenizer, CONV)
    assert ex.labels.count(eot) == 2  # one per assistant turn; system/user <|im_end|> stay masked
    assert tokenizer.pad_token_id != eot and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_input_ids_equal_serving_rendering(tokenizer):
    """Training tokens == what a server encodes for the same history (prompt part)."""
    from ftkit.core.masking import encode_prompt

    ex = build_example(tokenizer, CONV)
    prompt_ids = encode_prompt(tokenizer, CONV[:-1])
    assert ex.input_ids[: len(prompt_ids)] == prompt_ids
    # the last reply is trained from the first token after the generation prompt, none of the prompt's
    # own last tokens (the assistant header) is
    last_reply = [i for i, lab in enumerate(ex.labels) if lab != IGNORE_INDEX and i >= len(prompt_ids)]
    assert last_reply and last_reply[0] == len(prompt_ids)
    assert all(lab == IGNORE_INDEX for lab in ex.labels[len(prompt_ids) - 3: len(prompt_ids)])
    assert tokenizer.decode([ex.input_ids[i] for i in last_reply]) == CONV[-1]["content"] + "<|im_end|>"


def test_weight_zero_turn_not_trained(tokenizer):
    conv = [dict(m) for m in CONV]
    conv[2]["weight"] = 0
    assert trained_text(tokenizer, build_example(tokenizer, conv)) == "You're welcome.<|im_end|>"


def test_template_that_rewrites_history_is_rejected(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    # renders only the last message: earlier turns vanish, so turns are not a growing prefix
    tok.chat_template = ("{{ '<|im_start|>' + messages[-1]['role'] + '\n' + messages[-1]['content'] + '<|im_end|>\n' }}"
                         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    with pytest.raises(TemplateError, match="prefix"):
        build_example(tok, CONV)


MISTRAL_STYLE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                 "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                 "{{ message['content'] + eos_token }}{% endif %}{% endfor %}")


@pytest.fixture(params=["chatml", "llama3", "mistral"])
def templated(request, tokenizer):
    """The tokenizer with three different chat templates (none uses {% generation %} tags)."""
    import copy

    from ftkit.core.templates import NAMED

    tok = copy.deepcopy(tokenizer)
    if request.param == "llama3":
        tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
        tok.chat_template = NAMED["llama3"]
        return tok, "<|eot_id|>"
    tok.chat_template = MISTRAL_STYLE if request.param == "mistral" else NAMED["chatml"]
    return tok, "<|im_end|>"


def test_masks_on_three_templates(templated):
    from ftkit.convert.conversion import verify_mask

    tok, eot = templated
    conv = CONV if "[INST]" not in (tok.chat_template or "") else CONV[1:]
    ex = build_example(tok, conv)
    assert tok.convert_ids_to_tokens(end_of_turn_token_id(tok)) == eot
    assert trained_text(tok, ex) == (f"Order AC-123456 ships today.\n— AcmeCorp Support{eot}You're welcome.{eot}")
    assert verify_mask(tok, conv, ex, eot) is None


def test_verify_mask_reports_a_wrong_mask(tokenizer):
    from ftkit.convert.conversion import verify_mask

    ex = build_example(tokenizer, CONV)
    shifted = type(ex)(ex.input_ids, [IGNORE_INDEX] + ex.labels[:-1])  # off by one: the classic bug
    assert "but the input token there is" in verify_mask(tokenizer, CONV, shifted, "<|im_end|>")
    eos_masked = type(ex)(ex.input_ids, [IGNORE_INDEX if t == 2 else lab for t, lab in zip(ex.input_ids, ex.labels, strict=True)])
    assert "trained tokens decode to" in verify_mask(tokenizer, CONV, eos_masked, "<|im_end|>")


def test_truncate_at_turn_boundary_and_text_examples(tokenizer):
    from ftkit.convert.conversion import build_text_example, fit_length

    full = build_example(tokenizer, CONV)
    msgs, ex = fit_length(tokenizer, CONV, len(full.input_ids) - 1)
    assert msgs == CONV[:3] and len(ex.input_ids) < len(full.input_ids)
    assert fit_length(tokenizer, CONV, 5) is None
    t = build_text_example(tokenizer, "Once upon a time")
    assert t.labels == t.input_ids and t.input_ids[-1] == tokenizer.eos_token_id


def test_long_text_split_into_pieces_or_dropped_with_the_fix(tokenizer):
    """Completion tuning on a long document: `over_length: split` keeps every token, in
    consecutive max_seq_len pieces, the EOS only at the end; otherwise the record is quarantined
    with a reason that names the setting (never cut silently)."""
    from ftkit.convert.conversion import build_text_example, process_record

    text = " ".join(f"line {i} of a long plain-text document." for i in range(60))
    full = build_text_example(tokenizer, text)
    kw = {"system_prompt": None, "max_seq_len": 64, "eot_text": "<|im_end|>"}
    res = process_record(tokenizer, {"id": "doc", "text": text}, over_length="split", **kw)
    pieces = res["tokens"]
    assert res["ok"] and len(pieces) == -(-len(full.input_ids) // 64) > 1
    assert [p["id"] for p in pieces] == [f"doc#{k}" for k in range(len(pieces))]
    assert all(len(p["input_ids"]) <= 64 and p["labels"] == p["input_ids"] for p in pieces)
    assert sum((p["input_ids"] for p in pieces), []) == full.input_ids
    assert [p["input_ids"].count(tokenizer.eos_token_id) for p in pieces] == [0] * (len(pieces) - 1) + [1]
    assert res["chat"] == {"id": "doc", "text": text, "meta": {}}
    for how in ("drop", "truncate"):
        res = process_record(tokenizer, {"id": "doc", "text": text}, over_length=how, **kw)
        assert not res["ok"] and res["code"] == "over_length" and "convert.over_length: split" in res["reason"]
    # a conversation under `split` is truncated at a turn boundary, as with `truncate`
    full_conv = build_example(tokenizer, CONV)
    res = process_record(tokenizer, {"id": "c", "messages": CONV}, over_length="split",
                         **{**kw, "max_seq_len": len(full_conv.input_ids) - 1})
    assert res["ok"] and res["truncated"] and res["chat"]["messages"] == CONV[:3] and len(res["tokens"]) == 1
