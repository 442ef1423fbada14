"""Named chat templates, for models without one or to override the model's own.

``convert.chat_template`` may be null (the model's own), a name below, a path to a ``.jinja``
file, or a Jinja string. Whatever is chosen is saved with the tokenizer in stage 02 and used by
training, evaluation and serving alike.
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
NAMED = {"chatml": CHATML, "llama3": LLAMA3}


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
