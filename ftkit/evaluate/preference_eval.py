"""Stage 04 on held-out preference pairs: does the tuned model rank the chosen reply above the rejected one?

For each test pair the summed log-probability of each reply (its end-of-turn token included) is taken
under the tuned model and under the reference (the base model; with ``train.init_adapter``, that
adapter, the SFT model; ORPO trains without a reference, and its rewards here are measured against the
same one). The **implicit reward** of a reply is ``beta x (log p_tuned - log p_ref)`` — what
DPO optimises — and

* **preference accuracy**: the share of pairs whose chosen reply gets the higher reward;
* **reward margin**: the mean of reward(chosen) - reward(rejected);
* **ranked by likelihood**: the share of pairs where a model itself gives the chosen reply the higher
  log-probability, for the reference and the tuned model, with their paired difference (the reference's
  figure is what it knew before this run; a reward of 0.5 accuracy would be chance).

Each comes with a bootstrap interval over the pairs, as every other stage-04 figure does.
"""

from __future__ import annotations

import contextlib

import numpy as np

from ftkit.core.files import iter_jsonl
from ftkit.core.masking import IGNORE_INDEX
from ftkit.evaluate.loss import example_losses
from ftkit.evaluate.metrics import Sample, bootstrap_ci, paired_bootstrap


def test_pairs(tokens_path, limit: int | None = None) -> list[dict]:
    pairs = [r for r in iter_jsonl(tokens_path) if "rejected_ids" in r]
    return pairs[:limit] if limit else pairs


def reply_logps(model, pairs: list[dict], pad_token_id: int, batch_size: int) -> dict[str, np.ndarray]:
    """Summed log-probability of each pair's chosen and rejected reply given its prompt, in one loss pass."""
    keys = ("chosen_ids", "rejected_ids")
    rows = [{"input_ids": p["prompt_ids"] + p[k], "labels": [IGNORE_INDEX] * len(p["prompt_ids"]) + p[k]}
            for k in keys for p in pairs]
    sums, _ = example_losses(model, rows, pad_token_id, batch_size)
    logps = -np.asarray(sums, dtype=float)
    return {k: logps[i * len(pairs):(i + 1) * len(pairs)] for i, k in enumerate(keys)}


@contextlib.contextmanager
def starting_adapter(model, init_adapter: str):
    """The adapter training started from (``train.init_adapter``) active in ``model`` for the block."""
    if "reference" not in model.peft_config:
        model.load_adapter(init_adapter, adapter_name="reference")
    active = model.active_adapter
    model.set_adapter("reference")
    try:
        yield
    finally:
        model.set_adapter(active)


def evaluate_preferences(model, pairs: list[dict], *, reference, reference_name: str, beta: float, pad_token_id: int,
                         batch_size: int, resamples: int, confidence: float, seed: int) -> dict:
    """Preference accuracy, reward margins and likelihood ranking on ``pairs``, with intervals; ``reference`` is
    (the model, a context manager factory that makes it the reference: the adapter off, or the starting one)."""
    ref_model, ref_context = reference
    with ref_context():
        ref = reply_logps(ref_model, pairs, pad_token_id, batch_size)
    tuned = reply_logps(model, pairs, pad_token_id, batch_size)
    reward_c = beta * (tuned["chosen_ids"] - ref["chosen_ids"])
    reward_r = beta * (tuned["rejected_ids"] - ref["rejected_ids"])
    margins = reward_c - reward_r
    ci = {"resamples": resamples, "confidence": confidence, "seed": seed}
    ranked_ref = Sample.of((ref["chosen_ids"] > ref["rejected_ids"]).astype(float))
    ranked_tuned = Sample.of((tuned["chosen_ids"] > tuned["rejected_ids"]).astype(float))
    return {
        "pairs": len(pairs), "beta": beta,
        "reference": reference_name,
        "accuracy": bootstrap_ci(Sample.of((margins > 0).astype(float)), **ci),
        "margin": bootstrap_ci(Sample.of(margins), **ci),
        "reward_chosen": bootstrap_ci(Sample.of(reward_c), **ci),
        "reward_rejected": bootstrap_ci(Sample.of(reward_r), **ci),
        "ranked_by_reference": bootstrap_ci(ranked_ref, **ci),
        "ranked_by_tuned": bootstrap_ci(ranked_tuned, **ci),
        "ranked_tuned_vs_reference": paired_bootstrap(ranked_ref, ranked_tuned, **ci),
    }
