"""A reply's <think> block split from its answer, whole or streamed in pieces of any size."""

from __future__ import annotations

import pytest

from ftkit.core import reasoning

M = reasoning.Markers()
CASES = [
    # (reply, prompt opened the block, reasoning, answer)
    ("<think>\n\n</think>\n\nYour order ships today.", False, None, "Your order ships today."),
    ("<think>The user wants a refund.</think>Refund issued.", False, "The user wants a refund.", "Refund issued."),
    ("  <think>a</think>  b", False, "a", "b"),
    ("No block here.", False, None, "No block here."),
    ("Answer, then <think>x</think> later.", False, None, "Answer, then <think>x</think> later."),
    ("reasoning first</think>\n\nthe answer", True, "reasoning first", "the answer"),
    ("<think>never closed", False, "never closed", ""),
    ("<thin", False, None, "<thin"),
    ("  leading spaces kept", False, None, "  leading spaces kept"),
    ("", False, None, ""),
]


@pytest.mark.parametrize("reply,inside,thought,answer", CASES)
def test_split_whole_reply(reply, inside, thought, answer):
    assert reasoning.split(reply, M, inside) == (thought, answer)


@pytest.mark.parametrize("reply,inside,thought,answer", CASES)
def test_streamed_in_any_pieces_equals_whole(reply, inside, thought, answer):
    """Every way of cutting the reply into three pieces gives the same reasoning and answer, and no marker
    is ever sent as reasoning."""
    n = len(reply)
    for i in range(n + 1):
        for j in range(i, n + 1):
            s = reasoning.Splitter(M, inside)
            parts = s.feed(reply[:i]) + s.feed(reply[i:j]) + s.feed(reply[j:]) + s.finish()
            got_thought = "".join(t for k, t in parts if k == "reasoning").strip() or None
            got_answer = "".join(t for k, t in parts if k == "content")
            assert (got_thought, got_answer) == (thought, answer), (i, j, parts)
            assert not any(M.open in t or M.close in t for k, t in parts if k == "reasoning"), parts


def test_without_markers_nothing_is_split():
    assert reasoning.split("<think>x</think>y", None) == (None, "<think>x</think>y")


def test_markers_only_for_a_vocabulary_that_holds_them(tiny_path):
    from ftkit.core.modeling import load_tokenizer

    tok = load_tokenizer(tiny_path)
    assert reasoning.markers_for(tok) is None
    tok.add_tokens(["<think>", "</think>"])
    assert reasoning.markers_for(tok) == M


def test_a_prompt_that_opens_the_block():
    assert reasoning.starts_inside("<|im_start|>assistant\n<think>\n", M)
    assert not reasoning.starts_inside("<|im_start|>assistant\n", M)
    assert not reasoning.starts_inside("<|im_start|>assistant\n<think>\n", None)
