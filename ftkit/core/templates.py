"""Named chat templates, for models without one or to override the model's own.

``convert.chat_template`` may be null (the model's own; for a model without one, the named
template whose special tokens its vocabulary holds, said in report 02), a name below, a path to
a ``.jinja`` file, or a Jinja string. Whatever is chosen is saved with the tokenizer in stage 02
and used by training, evaluation and serving alike.

Each named template is the family's own layout, written without the tool-call and date logic
of the authors' templates. A template only works when its markers are single special tokens of
the vocabulary: written as text they would be split into pieces and the model would have no
token to stop on, so :func:`fitting` checks the vocabulary before one is chosen.
"""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Mistral's and Gemma's templates have no system role: the system text opens the first user turn.
MISTRAL = (
    "{{ bos_token }}{% set ns = namespace(sys='') %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.sys = message['content'] + '\\n\\n' %}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + ns.sys + message['content'] + '[/INST]' }}{% set ns.sys = '' %}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
GEMMA = (
    "{{ bos_token }}{% set ns = namespace(sys='') %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.sys = message['content'] + '\\n\\n' %}"
    "{% else %}{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\\n' + (ns.sys if role == 'user' else '') + message['content'] | trim"
    " + '<end_of_turn>\\n' }}{% if role == 'user' %}{% set ns.sys = '' %}{% endif %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
PHI3 = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
NAMED = {"chatml": CHATML, "llama3": LLAMA3, "mistral": MISTRAL, "gemma": GEMMA, "phi3": PHI3}
MARKERS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "mistral": ("[INST]", "[/INST]"),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
    "phi3": ("<|user|>", "<|assistant|>", "<|end|>"),
}
"""The tokens each named template needs as single tokens of the vocabulary."""


def resolve_template(spec: str | None) -> str | None:
    """The Jinja text for ``convert.chat_template`` (None keeps the model's own)."""
    if spec is None:
        return None
    if spec in NAMED:
        return NAMED[spec]
    if "{%" in spec or "{{" in spec:
        return spec
    p = Path(spec).expanduser()
    if p.exists():
        return p.read_text(encoding="utf-8")
    raise ValueError(f"convert.chat_template: {spec!r} is not a known name ({', '.join(NAMED)}), a Jinja string "
                     "or an existing .jinja file")


def fitting(tokenizer) -> list[str]:
    """The named templates whose markers are each one token of ``tokenizer``'s vocabulary (and,
    for Mistral, whose EOS exists), in the order above."""
    vocab = tokenizer.get_vocab()
    out = [name for name, marks in MARKERS.items() if all(m in vocab for m in marks)]
    return [n for n in out if n != "mistral" or tokenizer.eos_token_id is not None]


def choose(tokenizer, spec: str | None) -> tuple[str, str]:
    """The template to train and serve with, and a sentence saying where it came from.

    Raises:
        ValueError: the model has no template, none was configured, and no named template's
            markers are tokens of its vocabulary (a message naming what would fit and the fix).
    """
    if spec is not None:
        return resolve_template(spec), f"convert.chat_template: {spec if spec in NAMED else 'your template'}"
    if tokenizer.chat_template:
        return tokenizer.chat_template, "the model's own"
    fits = fitting(tokenizer)
    if fits:
        name = fits[0]
        return NAMED[name], (f"named template '{name}', chosen automatically: the model has no chat template and its "
                             f"vocabulary holds {', '.join(MARKERS[name])} as single tokens"
                             + (f" (also fitting: {', '.join(fits[1:])})" if fits[1:] else ""))
    raise ValueError(
        "the tokenizer has no chat template, and no named template fits its vocabulary (their markers would be split "
        f"into pieces: {'; '.join(f'{n} needs ' + ', '.join(m) for n, m in MARKERS.items())}). Use the model's "
        "instruct/chat version, set convert.chat_template to a Jinja string whose turns end with a special token of "
        "this vocabulary (such as its EOS), or give the data as plain text (a `text` field per record, for completion tuning)."
    )
