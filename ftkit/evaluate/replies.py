"""Replies generated a batch at a time, so stage 04 can print a progress line between batches
(:mod:`ftkit.core.progress`); the replies are the ones :func:`ftkit.core.generation.generate` gives in
one call."""

from __future__ import annotations

from ftkit.core.generation import generate
from ftkit.core.progress import Progress


def generate_with_progress(label: str, model, tokenizer, prompts: list[list[dict]], *, batch_size: int,
                           seed: int | None = None, **kw) -> list[dict]:
    """:func:`generate` over ``prompts`` in its own batches, a progress line at the interval. Only the
    first batch seeds torch's generator: the later ones continue its stream, as in one call, so
    sampled replies do not change."""
    out: list[dict] = []
    with Progress(label, len(prompts), unit="replies") as progress:
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i:i + batch_size]
            out += generate(model, tokenizer, batch, batch_size=batch_size, seed=seed if i == 0 else None, **kw)
            progress.update(len(batch))
    return out
