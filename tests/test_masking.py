import pytest

from ftkit.masking import IGNORE_INDEX, TemplateError, build_example, end_of_turn_token_id, trained_text

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
    from ftkit.masking import encode_prompt

    ex = build_example(tokenizer, CONV)
    prompt_ids = encode_prompt(tokenizer, CONV[:-1])
    assert ex.input_ids[: len(prompt_ids)] == prompt_ids
    first_trained = next(i for i, lab in enumerate(ex.labels[len(prompt_ids) - 5:]) if lab != IGNORE_INDEX)
    assert ex.labels[len(prompt_ids) - 5 + first_trained:][0] != IGNORE_INDEX


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
