"""Held-out loss per trained token, streamed: each batch's per-example losses summed and its logits
dropped, rows read in chunks, so memory does not grow with the test set."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Iterator

import torch

from ftkit.core.batches import PadCollator, takes_logit_positions
from ftkit.core.masking import IGNORE_INDEX
from ftkit.core.modeling import forward_params

log = logging.getLogger(__name__)


CHUNK = 256  # rows read (and length-sorted) at a time for the loss pass


@torch.no_grad()
def example_losses(model, rows: Iterable[dict], pad_token_id: int, batch_size: int = 8,
                   max_batch_tokens: int | None = None, progress=None) -> tuple[list, list]:
    """Summed token loss and trained-token count of each row (``input_ids``/``labels``), in input order.

    Rows are consumed lazily, CHUNK at a time, sorted by length inside a chunk so that batches
    carry little padding; a batch holds at most ``max_batch_tokens`` padded tokens (default
    ``batch_size`` x 512), so the logits of one batch, the largest allocation, have a fixed
    ceiling whatever the number or mix of rows; each batch's logits are freed before the next.
    Logits are computed only at positions whose next token is trained (``logits_to_keep``), so
    prompt tokens cost no vocabulary projection.

    A row may carry ``prefix_len``: its first ``prefix_len`` tokens are untrained and shared with
    other rows (the prompted model's system prompt and few-shot turns). Rows sharing a prefix are
    then run on one cached forward of it (:func:`_prefix_groups`, :func:`_prefix_cache`) instead of each
    re-reading it.

    ``progress``: a :class:`ftkit.core.progress.Progress` counting the rows scored, batch by batch.
    """
    max_batch_tokens = max_batch_tokens or batch_size * 512
    device = next(model.parameters()).device
    collate = PadCollator(pad_token_id)
    sums, counts = [], []
    chunk: list[dict] = []
    cache_arg = _cache_kwarg(model)
    positions = takes_logit_positions(model)  # else: all positions, then select

    def batches(rows_: list[dict], order: list[int]) -> Iterator[list[int]]:
        """Up to ``batch_size`` rows and ``max_batch_tokens`` padded tokens per batch (a longer row goes alone)."""
        idx: list[int] = []
        for j in order:
            longest = len(rows_[j]["input_ids"])  # rows come sorted by length, so the newest is the longest
            if idx and (len(idx) == batch_size or (len(idx) + 1) * longest > max_batch_tokens):
                yield idx
                idx = []
            idx.append(j)
        if idx:
            yield idx

    def score(rows_: list[dict], members: list[int], s: list, c: list, cache=None) -> None:
        order = sorted(members, key=lambda i: len(rows_[i]["input_ids"]))
        for idx in batches(rows_, order):
            batch = {k: v.to(device) for k, v in collate([rows_[j] for j in idx]).items()}
            # logits only where some row of the batch has a trained next token: prompts need none
            keep = (batch["labels"][:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1)
            kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            if cache is not None:
                past = copy.deepcopy(cache)
                past.batch_repeat_interleave(len(idx))
                ones = torch.ones(len(idx), past.get_seq_length(), dtype=kw["attention_mask"].dtype, device=device)
                kw.update(attention_mask=torch.cat([ones, kw["attention_mask"]], 1), use_cache=True,
                          **{cache_arg: past})
            logits = model(**kw, logits_to_keep=keep).logits if positions else model(**kw).logits[:, keep]
            labels = batch["labels"][:, keep + 1]
            loss = torch.nn.functional.cross_entropy(
                logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
            for j, ls, n in zip(idx, loss.sum(1).tolist(), (labels != IGNORE_INDEX).sum(1).tolist(), strict=True):
                s[j], c[j] = ls, n
            del logits, loss, kw
            if progress is not None:
                progress.update(len(idx))

    def flush():
        s, c = [0.0] * len(chunk), [0] * len(chunk)
        plain, shared = _prefix_groups(chunk)
        if plain:
            score(chunk, plain, s, c)
        for prefix, members in shared.items():
            cache = _prefix_cache(model, prefix, device)
            if cache is None:  # this model cannot continue from a cache: read every row whole
                score(chunk, members, s, c)
                continue
            # each row continues from the prefix's last token, whose logits predict the row's first own token
            tails = {j: {"input_ids": chunk[j]["input_ids"][len(prefix):], "labels": chunk[j]["labels"][len(prefix):]}
                     for j in members}
            tail_rows = [tails.get(j, chunk[j]) for j in range(len(chunk))]
            score(tail_rows, members, s, c, cache)
        sums.extend(s)
        counts.extend(c)
        chunk.clear()

    for row in rows:
        chunk.append(row)
        if len(chunk) == CHUNK:
            flush()
    if chunk:
        flush()
    return sums, counts


def _prefix_groups(rows: list[dict]) -> tuple[list[int], dict[tuple, list[int]]]:
    """Rows read whole, and rows grouped by the shared prefix they continue from (all but the last
    token of their untrained ``prefix_len`` tokens; at least two rows and 16 tokens to be worth a cache)."""
    plain, shared = [], {}
    for j, r in enumerate(rows):
        p = r.get("prefix_len") or 0
        if p > 16 and all(x == IGNORE_INDEX for x in r["labels"][:p]):
            shared.setdefault(tuple(r["input_ids"][: p - 1]), []).append(j)
        else:
            plain.append(j)
    for key in [k for k, v in shared.items() if len(v) < 2]:
        plain += shared.pop(key)
    return plain, shared


def _cache_kwarg(model) -> str:
    """The forward argument that takes a key/value cache: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    return "cache" if "cache" in forward_params(model) else "past_key_values"


def _prefix_cache(model, prefix: tuple, device):
    """The key/value cache of one forward over ``prefix``, or None where the model has no such cache."""
    try:
        out = model(input_ids=torch.tensor([prefix], device=device), use_cache=True)
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = getattr(out, "past_key_values", None)
        if cache is None or not hasattr(cache, "batch_repeat_interleave"):
            return None
        return cache
    except (TypeError, ValueError, NotImplementedError) as err:
        log.warning("prefix cache unavailable (%s); the prompted rows are read whole", err)
        return None


def summarise_loss(sums: list[float], counts: list[int]) -> dict:
    total = sum(counts)
    mean = sum(sums) / max(total, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50)), "tokens": total}


def heldout_loss(model, rows: Iterable[dict], pad_token_id: int, batch_size: int = 8) -> dict:
    """Mean loss per trained (assistant) token over ``rows`` and its perplexity."""
    return summarise_loss(*example_losses(model, rows, pad_token_id, batch_size))
