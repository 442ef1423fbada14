"""Stage 02, part two: render with the model's chat template and build assistant-only labels.

The mask works for any chat template, without ``{% generation %}`` tags: each assistant turn
is located by rendering the conversation turn by turn (the prompt up to that turn with the
generation prompt, then the prompt plus the turn) and taking the characters in between. The
trained span is the reply *and* the template's end-of-turn marker (``<|im_end|>``,
``<|eot_id|>``, ``</s>``…), so the model learns to stop; whitespace the template prints after
the marker is not trained. Token ids come from one tokenisation of the whole conversation
(the same string the server renders), mapped to the spans by character offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100


class TemplateError(ValueError):
    """The chat template does not render a conversation as a growing prefix."""


class HistoryRewriteError(TemplateError):
    """The template renders an earlier reply differently once the conversation goes on (Qwen3 drops
    the reasoning of earlier replies): each reply can only be trained as the last turn of its prefix."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)

    def to_dict(self) -> dict:
        return {"input_ids": self.input_ids, "labels": self.labels}


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The exact text the model sees (training and serving both call this).

    A template without a system role (Gemma 2, some Mistral ones raise on it) gets the system
    message folded into the first user turn, as Gemma 3's own template does; stage 02 counts the
    records this applies to (:func:`folds_system`), so the change is reported, not silent.
    """
    if messages and messages[0].get("role") == "system" and folds_system(tokenizer):
        messages = fold_system(messages)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def fold_system(messages: list[dict]) -> list[dict]:
    """The system message's text put in front of the first user message (separated by a blank line)."""
    system, rest = messages[0], list(messages[1:])
    k = next((i for i, m in enumerate(rest) if m.get("role") == "user"), None)
    if k is None:
        return rest
    rest[k] = {**rest[k], "content": f"{system['content']}\n\n{rest[k]['content']}"}
    return rest


def folds_system(tokenizer) -> bool:
    """True when the chat template refuses a system message (it raises on a probe that has one), or
    moves it as the conversation grows (Mistral's put it before the *last* user turn, so earlier
    turns would render differently in training than when they were generated)."""
    key = (tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)
    cached = _FOLDS.get(key)
    if cached is None:
        s, u1, a1, u2 = ({"role": r, "content": c} for r, c in
                         (("system", "s"), ("user", "u1"), ("assistant", "a1"), ("user", "u2")))

        def grows(head, full):
            first = tokenizer.apply_chat_template(head, tokenize=False, add_generation_prompt=True)
            return tokenizer.apply_chat_template(full, tokenize=False, add_generation_prompt=True).startswith(first)

        try:
            cached = not grows([s, u1], [s, u1, a1, u2]) and grows([u1], [u1, a1, u2])
        except Exception:  # jinja's raise_exception: "System role not supported"
            cached = True
        _FOLDS[key] = cached
    return cached


_FOLDS: dict[tuple, bool] = {}


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a prompt ending with the assistant generation prompt."""
    return tokenizer(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each trained assistant turn."""
    text = render(tokenizer, messages)
    final = closing_suffix(tokenizer)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or m.get("weight", 1) == 0:
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1])
        if final and upto.endswith(final):
            upto = upto[: len(upto) - len(final)]
        if not upto.startswith(before):
            raise TemplateError(
                f"the chat template's generation prompt is not how it renders the start of reply {i} (it writes "
                f"{before[-40:]!r} to generate but {upto[len(before) - 40:len(before) + 10]!r} in the conversation, "
                "e.g. it opens a reasoning block only when generating), so what is trained would not be what the "
                "model continues from when served: the prompt must be a prefix of the rendered reply"
            )
        if not text.startswith(upto):
            raise HistoryRewriteError(
                f"the chat template rewrites earlier turns: messages[:{i + 1}] render differently inside the whole "
                "conversation (e.g. it drops the reasoning of earlier replies), so an earlier reply would be trained "
                "in a form the model never sees when it writes it; stage 02 trains such a conversation as one "
                "example per reply, each reply the last turn of its own prefix"
            )
        end = len(before) + len(upto[len(before):].rstrip())
        spans.append((len(before), end))
    return text, spans


def closing_suffix(tokenizer) -> str:
    """Text a template writes once at the very end of a whole conversation, after the last turn's
    own end (Phi-3.5 appends EOS after its final ``<|end|>``); not part of any turn, so not trained:
    the model stops at the turn's end, as when serving."""
    key = (tokenizer.chat_template, tokenizer.eos_token)  # the suffix is the EOS, which differs per vocabulary
    if key not in _SUFFIX:
        u, a = {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}
        one, two = render(tokenizer, [u, a]), render(tokenizer, [u, a, u, a])
        eos = tokenizer.eos_token or ""
        cut = one.rstrip()
        _SUFFIX[key] = eos if eos and cut.endswith(eos) and not two.startswith(one) and two.startswith(
            cut[: len(cut) - len(eos)]) else ""
    return _SUFFIX[key]


_SUFFIX: dict[tuple, str] = {}


def build_example(tokenizer, messages: list[dict]) -> Example:
    """Tokenise one conversation with labels on assistant tokens (end-of-turn included) only."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        for k, (a, b) in enumerate(offsets):
            if a >= start and b <= end and b > a:
                labels[k] = ids[k]
    return Example(ids, labels)


def special_ids(tokenizer) -> set[int]:
    """Ids of every special token: the named ones (bos/eos/pad/...) and the added special tokens
    that several families close their turns with (Gemma's ``<end_of_turn>``, Phi's ``<|end|>``),
    which ``all_special_ids`` does not list."""
    added = {i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False)}
    return set(tokenizer.all_special_ids) | added


def end_of_turn_token_id(tokenizer) -> int:
    """The token the chat template closes an assistant turn with (what generation must stop on)."""
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    ex = build_example(tokenizer, probe)
    trained = [t for t in ex.labels if t != IGNORE_INDEX]
    if not trained:
        raise TemplateError("the chat template rendered no assistant tokens for a probe conversation")
    last = trained[-1]
    if last not in special_ids(tokenizer):
        raise TemplateError(
            f"the chat template ends an assistant turn with {tokenizer.decode([last])!r}, which is not one special "
            "token of this vocabulary (a marker written as text is split into pieces): the model would have no "
            "token to stop on. Use a template whose turns end with an end-of-turn/EOS token of the vocabulary "
            f"({', '.join(repr(t) for t in _special_texts(tokenizer)[:8])}...)."
        )
    return last


def _special_texts(tokenizer) -> list[str]:
    return [tokenizer.convert_ids_to_tokens(i) for i in sorted(special_ids(tokenizer))]


def turn_prefix(tokenizer) -> str:
    """Text the template writes at the start of an assistant turn beyond the generation prompt
    (Qwen3 writes an empty ``<think>\\n\\n</think>\\n\\n`` block); the model learns to write it, so it is
    trained, and :func:`ftkit.convert.conversion.verify_mask` accepts it before each reply."""
    marker = "FTKITPROBE"
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
    text, spans = assistant_spans(tokenizer, probe)
    turn = text[spans[0][0]:spans[0][1]]
    return turn[: turn.index(marker)] if marker in turn else ""


def describe_mask(tokenizer, example: Example) -> list[tuple[str, bool]]:
    """(token text, trained?) pairs, for showing a person what is learned."""
    return [(tokenizer.decode([t]), lab != IGNORE_INDEX) for t, lab in zip(example.input_ids, example.labels, strict=True)]


def trained_text(tokenizer, example: Example) -> str:
    """Decode the input tokens at trained positions (stage 02 checks this equals the assistant replies)."""
    return tokenizer.decode([t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab != IGNORE_INDEX])
