"""How much stage 04 costs, and how many test rows its loss passes read.

Stage 04 reads every test row three times (base, prompted, tuned) and generates replies for
``num_generations`` prompts per model, then the forgetting check. On a CPU, a test split of a few
hundred rows costs more than the training did (a 5,000-record dataset with a 270M model: 19 minutes of
evaluation after 5 of training). By default the loss passes are bounded by ``evaluate.time_budget_s``
(null: as long as training took, at least :data:`MIN_BUDGET_S`), and the rows are the first ones of
the (seeded, shuffled) test split, so a rerun reads the same rows. The report gives the interval width
those rows bought and what all of them would have bought; ``evaluate.all_rows`` reads every row.

The rate comes from stage 03's measured training speed, not from a timing taken now, so the number
of rows does not change between reruns of stage 04: a forward pass is ~2NT FLOPs against LoRA's
~4NT for a training step (activation gradients, no weight gradients), full fine-tuning ~6NT.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

MIN_BUDGET_S = 60.0
MIN_ROWS = 50
"""At least this many rows (or all of them) whatever the budget: fewer buy intervals too wide to read."""
# a forward pass over a token against the method's training step (forward + backward) over it
FORWARD_SPEEDUP = {"lora": 2.0, "dora": 2.0, "qlora": 2.0, "full": 3.0}
# a generated token costs a few forward tokens' worth (every weight is read for each step of the
# batch): demo, SmolLM2-135M on 2 cores, 48 replies in one batch: 62 new tokens/s against 212
# forward tokens/s, prefill included (3.4x); in batches of 8: 6.6x
DECODE_COST = 4.0


@dataclass(frozen=True)
class EvalBudget:
    rows: int  # test rows the loss passes read
    total_rows: int
    budget_s: float | None  # None: every row was asked for
    forward_tokens_per_s: float | None
    est_loss_s: float | None  # the three loss passes over ``rows``
    est_all_rows_loss_s: float | None
    est_generation_s: float | None  # the generations of the three models and the forgetting check
    reason: str

    @property
    def est_total_s(self) -> float | None:
        if self.est_loss_s is None or self.est_generation_s is None:
            return None
        return self.est_loss_s + self.est_generation_s

    def to_dict(self) -> dict:
        return {**asdict(self), "est_total_s": self.est_total_s}


def plan_rows(evaluate_cfg, method: str, test_lengths: list[int], train_tokens_per_s: float | None,
              train_seconds: float | None, forgetting_rows: int = 40) -> EvalBudget:
    """The rows stage 04's loss passes read and its estimated cost. ``test_lengths``: token counts of
    the test rows in order; ``train_tokens_per_s`` and ``train_seconds``: stage 03's measured figures
    (None when unknown: then every row is read)."""
    e = evaluate_cfg
    n = len(test_lengths) if e.max_examples is None else min(len(test_lengths), e.max_examples)
    rate = train_tokens_per_s * FORWARD_SPEEDUP.get(method, 2.0) if train_tokens_per_s else None
    mean = sum(test_lengths[:n]) / max(n, 1)
    gen_tokens = 3 * e.num_generations * e.max_new_tokens + 2 * e.forgetting.num_generations * e.forgetting.max_new_tokens
    # (prompts are prefilled once per reply; the forgetting check's two loss passes are over its own rows)
    gen_s = (DECODE_COST * gen_tokens + 2 * forgetting_rows * mean) / rate if rate else None

    def loss_s(rows: int) -> float | None:
        # three passes; the prompted one reads its shared prefix once (cached), not once per row
        return 3 * sum(test_lengths[:rows]) / rate if rate else None

    if e.max_examples is not None or e.all_rows or rate is None:
        why = (f"evaluate.max_examples: the first {n} test rows" if e.max_examples is not None else
               "evaluate.all_rows: every test row" if e.all_rows else
               "no training speed to plan from (stage 03's metrics): every test row")
        return EvalBudget(n, len(test_lengths), None, rate, loss_s(n), loss_s(len(test_lengths)), gen_s, why)
    budget = e.time_budget_s if e.time_budget_s is not None else max(MIN_BUDGET_S, train_seconds or 0.0)
    spend = max(budget - (gen_s or 0.0), 0.0)
    rows, used = 0, 0.0
    for length in test_lengths[:n]:
        used += 3 * length / rate
        if used > spend:
            break
        rows += 1
    rows = max(rows, min(n, MIN_ROWS))
    source = ("evaluate.time_budget_s" if e.time_budget_s is not None
              else f"as long as training took, at least {MIN_BUDGET_S:.0f} s")
    why = (f"every test row fits the {budget:.0f} s budget" if rows >= n else
           f"the first {rows} of {n} test rows: what fits the {budget:.0f} s budget ({source}; "
           "evaluate.all_rows: true reads every row)")
    return EvalBudget(rows, len(test_lengths), budget, rate, loss_s(rows), loss_s(n), gen_s, why)


def width_note(budget: EvalBudget, delta: dict | None, confidence: float) -> str | None:
    """What the rows bought: the width of the tuned − base loss interval, and what reading every row
    would give (intervals narrow as 1/sqrt(rows)), with its estimated extra time."""
    if not delta or delta.get("ci_low") is None or math.isnan(delta["ci_low"]):
        return None
    width = delta["ci_high"] - delta["ci_low"]
    level = round(100 * confidence)
    text = f"tuned − base loss: {level}% interval {width:.3f} wide on {budget.rows} rows"
    if budget.rows < budget.total_rows:
        full = width * math.sqrt(budget.rows / budget.total_rows)
        extra = (budget.est_all_rows_loss_s or 0.0) - (budget.est_loss_s or 0.0)
        text += (f"; all {budget.total_rows} rows would narrow it to about {full:.3f} for ~{extra:.0f} s more "
                 "(evaluate.all_rows: true)")
    return text


def before_training(cfg, test_lengths: list[int], train_tokens: int, est_train_seconds: float) -> EvalBudget:
    """Stage 04 planned from the pre-flight estimate of training (tokens and seconds), for the
    pre-flight lines of stages 02 and 03; stage 04 itself plans from the measured training."""
    ok = train_tokens > 0 and math.isfinite(est_train_seconds) and est_train_seconds > 0
    return plan_rows(cfg.evaluate, cfg.train.method, test_lengths,
                     train_tokens / est_train_seconds if ok else None, est_train_seconds if ok else None)
