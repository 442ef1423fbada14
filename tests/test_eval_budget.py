"""Stage 04's cost bounded by a time budget: which rows, what it estimates, what the report says."""

from __future__ import annotations

import math

from ftkit.core.config import load_config
from ftkit.core.eval_budget import MIN_ROWS, before_training, plan_rows, width_note


def _plan(lengths, tokens_per_s=1000.0, train_seconds=100.0, **evaluate):
    return plan_rows(load_config(evaluate=evaluate).evaluate, "lora", lengths, tokens_per_s, train_seconds)


def test_rows_are_the_first_that_fit_the_budget():
    lengths = [100] * 1000
    p = _plan(lengths)
    gen = p.est_generation_s
    assert gen and 0 < gen < 100
    # a forward pass runs at 2 x the LoRA training rate; three passes of a 100-token row: 0.15 s
    assert p.rows == int((100 - gen) / 0.15) and MIN_ROWS < p.rows < 1000 and p.total_rows == 1000
    assert math.isclose(p.est_loss_s, 0.15 * p.rows) and math.isclose(p.est_all_rows_loss_s, 150)
    assert "the first" in p.reason and "evaluate.all_rows" in p.reason
    assert _plan(lengths) == p  # the same rows on a rerun: planned from stage 03's figures, not a timing now


def test_budget_choices():
    lengths = [100] * 1000
    assert _plan(lengths, train_seconds=1e4).rows == 1000
    assert _plan(lengths, tokens_per_s=100, train_seconds=1.0).rows == MIN_ROWS  # never fewer than intervals can use
    assert _plan(lengths, time_budget_s=3600).rows == 1000  # the configured budget wins over training's time
    assert _plan(lengths, all_rows=True).rows == 1000
    assert _plan(lengths, all_rows=True).budget_s is None
    assert _plan(lengths, max_examples=30).rows == 30 and "max_examples" in _plan(lengths, max_examples=30).reason
    assert _plan([100] * 20, tokens_per_s=100, train_seconds=1.0).rows == 20
    assert _plan(lengths, tokens_per_s=None).rows == 1000  # nothing to plan from: everything, said so
    # twice the generations cost more of the budget, so fewer rows are read
    assert _plan(lengths, num_generations=64).rows < _plan(lengths, num_generations=32).rows


def test_pre_flight_plan_and_width_note():
    cfg = load_config()
    p = before_training(cfg, [80] * 400, train_tokens=40_000, est_train_seconds=200.0)
    assert p.est_total_s is not None and p.rows <= 400
    assert before_training(cfg, [80] * 400, 0, float("nan")).est_total_s is None
    note = width_note(p, {"delta": -0.5, "ci_low": -0.6, "ci_high": -0.4}, 0.95)
    assert note.startswith(f"tuned − base loss: 95% interval 0.200 wide on {p.rows} rows")
    if p.rows < 400:
        assert f"{0.2 * math.sqrt(p.rows / 400):.3f}" in note
    assert width_note(p, {"delta": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}, 0.95) is None
