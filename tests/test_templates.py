"""Named chat templates: each verifies a multi-turn mask on a vocabulary holding its markers; a model without a
template gets the one its vocabulary fits (and says so), or an error naming what each would need."""

import pytest
from test_chat_templates import CONVERSATION, tokenizer_for

from ftkit.convert.conversion import process_record
from ftkit.core.masking import end_of_turn_token_id, turn_prefix
from ftkit.core.templates import MARKERS, NAMED, choose, fitting


@pytest.mark.parametrize("name", list(NAMED))
def test_named_template_verifies_multi_turn(name):
    tok = tokenizer_for(NAMED[name])
    eot = end_of_turn_token_id(tok)
    res = process_record(tok, {"messages": CONVERSATION}, system_prompt=None, max_seq_len=4096, over_length="drop",
                         eot_text=tok.decode([eot]), prefix=turn_prefix(tok))
    assert res["ok"], res
    assert res["turns"] == 2 and len(res["tokens"]) == 1


def test_a_model_without_template_gets_the_one_its_vocabulary_fits():
    tok = tokenizer_for(NAMED["gemma"])  # holds <start_of_turn>, <end_of_turn>
    tok.chat_template = None
    assert fitting(tok) == ["gemma"]
    text, source = choose(tok, None)
    assert text == NAMED["gemma"] and "'gemma', chosen automatically" in source and "<end_of_turn>" in source


def test_no_fitting_template_is_an_error_naming_the_markers():
    tok = tokenizer_for("{{ messages }}")  # no marker of any named template
    tok.chat_template = None
    with pytest.raises(ValueError) as e:
        choose(tok, None)
    for marks in MARKERS.values():
        assert all(m in str(e.value) for m in marks)


def test_configured_template_wins_over_the_models():
    tok = tokenizer_for(NAMED["chatml"])
    text, source = choose(tok, "llama3")
    assert text == NAMED["llama3"] and source == "convert.chat_template: llama3"
