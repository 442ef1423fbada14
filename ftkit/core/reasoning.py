"""A reply's reasoning block (``<think>…</think>``: Qwen3, QwQ, DeepSeek R1, SmolLM3) served apart from its answer.

OpenAI-compatible servers that host reasoning models (vLLM, SGLang, DeepSeek's API) return the block's text
as ``message.reasoning_content`` (``delta.reasoning_content`` when streaming) and only the answer as
``content``, so client code that shows ``content`` never shows the model's scratchpad, nor the empty block
that Qwen3 writes when thinking is off. ftkit's server does the same for a vocabulary that holds both markers.
"""

from __future__ import annotations

from dataclasses import dataclass

OPEN, CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class Markers:
    open: str = OPEN
    close: str = CLOSE


def markers_for(tokenizer) -> Markers | None:
    """The reasoning markers when the vocabulary holds both as tokens, else None (nothing is split)."""
    vocab = tokenizer.get_vocab()
    return Markers() if OPEN in vocab and CLOSE in vocab else None


def starts_inside(prompt_text: str, markers: Markers | None) -> bool:
    """Whether the generation prompt itself opened the block (DeepSeek R1's template ends with ``<think>\\n``),
    so the reply begins with reasoning and only the closing marker follows."""
    if markers is None:
        return False
    tail = prompt_text.rstrip()
    return tail.endswith(markers.open)


class Splitter:
    """Feed text pieces as they are generated; get ``(kind, text)`` parts, kind ``"reasoning"`` or ``"content"``.

    A block counts as reasoning only at the start of the reply (leading whitespace allowed); a marker later in
    the answer is answer text. Pieces that could be the start of a marker are held back until they are known,
    so a marker split across pieces is never emitted. Whitespace between the block and the answer is dropped.
    """

    def __init__(self, markers: Markers | None, inside: bool = False):
        self.markers = markers
        self.state = "reasoning" if inside and markers else ("start" if markers else "content")
        self.held = ""

    def feed(self, piece: str) -> list[tuple[str, str]]:
        self.held += piece
        out: list[tuple[str, str]] = []
        while True:
            if self.state == "content":
                if self.held:
                    out.append(("content", self.held))
                self.held = ""
                return out
            if self.state == "start":
                text = self.held.lstrip()
                if not text:
                    return out  # only whitespace so far: it may precede the block
                if text.startswith(self.markers.open):
                    self.held, self.state = text[len(self.markers.open):], "reasoning"
                    continue
                if self.markers.open.startswith(text):
                    return out  # a partial marker: wait
                self.state = "content"
                continue
            if self.state == "reasoning":
                at = self.held.find(self.markers.close)
                if at >= 0:
                    if at:
                        out.append(("reasoning", self.held[:at]))
                    self.held, self.state = self.held[at + len(self.markers.close):], "after"
                    continue
                keep = _partial_suffix(self.held, self.markers.close)
                if len(self.held) > keep:
                    out.append(("reasoning", self.held[: len(self.held) - keep]))
                    self.held = self.held[len(self.held) - keep:]
                return out
            if self.state == "after":  # whitespace between the block and the answer
                self.held = self.held.lstrip()
                if not self.held:
                    return out
                self.state = "content"

    def finish(self) -> list[tuple[str, str]]:
        """What is still held when generation ends (an unclosed block stays reasoning)."""
        held, self.held = self.held, ""
        if not held or self.state == "after":
            return []
        return [("reasoning" if self.state == "reasoning" else "content", held)]


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def split(text: str, markers: Markers | None, inside: bool = False) -> tuple[str | None, str]:
    """(reasoning or None when there is none or it is empty, answer) of a whole reply."""
    s = Splitter(markers, inside)
    parts = s.feed(text) + s.finish()
    reasoning = "".join(t for k, t in parts if k == "reasoning").strip()
    return reasoning or None, "".join(t for k, t in parts if k == "content")
