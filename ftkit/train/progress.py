"""Training progress as plain lines on stdout, for ``make run`` and ``ftkit run`` (headless runs)::

    03_train: step 40/120 (33%) · loss 1.84 · val 1.91 · lr 1.8e-04 · 412 tokens/s · 2m10s elapsed · ETA 4m20s

A Trainer callback: one line at the first logged step, so a user sees training started, then at
most one per interval (:mod:`ftkit.core.progress`, 30 s or ``FTKIT_PROGRESS_SECONDS``) and one when
training ends. The main process only. The interval is checked at every optimiser step, so it holds
however far apart ``train.logging_steps`` puts the logged losses. Each validation pass (during
training, and the final one after it) ends with its own line, and prints while it runs at the interval
counted from the last training line (a step plus a validation pass never leaves the terminal silent
for longer than the interval and one batch)::

    03_train: validation: batches 11/11 (100%) · val 0.881 · 1.25 batches/s · done in 8s
"""

from __future__ import annotations

import time

from transformers import TrainerCallback
from transformers.trainer_utils import has_length

from ftkit.core.progress import Progress


class TrainingProgress(TrainerCallback):
    """Step/total, the latest train (and val) loss, learning rate, tokens/s, elapsed and ETA."""

    def __init__(self, label: str = "03_train", *, every: float | None = None, clock=time.monotonic, write=None):
        self.label, self.every, self.clock = label, every, clock
        self.progress: Progress | None = None
        self.validation: Progress | None = None
        self._write = {"write": write} if write else {}
        self.figures: dict[str, float | None] = {}
        self.tokens_before = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        # a resumed run starts at its checkpoint's step and tokens: pace and ETA count this run's work only
        self.progress = Progress(self.label, state.max_steps, unit="step", initial=state.global_step, rate=False,
                                 every=self.every, clock=self.clock, **self._write)
        self.tokens_before = state.num_input_tokens_seen or 0
        self.figures = {"loss": None, "val": None, "lr": None}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is None or self.progress.finished:
            return
        logs = logs or {}
        if not {"loss", "learning_rate", "eval_loss"} & logs.keys():
            return  # the run's summary (train_runtime…): the final line follows at on_train_end
        if "loss" in logs:
            self.figures["loss"] = logs["loss"]
        if "learning_rate" in logs:
            self.figures["lr"] = logs["learning_rate"]
        if "eval_loss" in logs:
            self.figures["val"] = logs["eval_loss"]
        self._report(state)

    def on_step_end(self, args, state, control, **kwargs):
        # nothing before the first logged loss (the first line is the first logged step's), and nothing
        # where the Trainer is about to log: on_log reports that step with its new loss
        if self.progress is not None and self.figures.get("loss") is not None and not control.should_log:
            self._report(state)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        # validation, during training and the final one after it: a line when it ends (with its loss),
        # and at the interval while a long one runs
        if not state.is_world_process_zero:
            return
        if self.validation is None:  # called after the first batch: the pace is taken from the second on
            total = len(eval_dataloader) if has_length(eval_dataloader) else None
            since = self.progress.last_line_at if self.progress is not None else None
            self.validation = Progress(f"{self.label}: validation", total, unit="batches", initial=1,
                                       first_line=False, since=since, every=self.every, clock=self.clock,
                                       **self._write)
        else:
            self.validation.update()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.validation is not None:
            self.validation.done(val=(metrics or {}).get("eval_loss"))
            self.validation = None

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.count = state.global_step
            self.progress.done(**self._figures(state))

    def _report(self, state) -> None:
        self.progress.set(state.global_step, **self._figures(state))

    def _figures(self, state) -> dict:
        elapsed = self.progress.clock() - self.progress.started
        tokens = (state.num_input_tokens_seen or 0) - self.tokens_before
        return {**self.figures, "tokens_per_s": tokens / elapsed if elapsed > 0 and tokens > 0 else None}
