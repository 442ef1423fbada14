"""Stopping a training run cleanly, and the live view a person sees while it trains.

A stop is requested by interrupting the kernel in an interactive session (the notebook's Interrupt
button, or I, I), or by creating ``outputs/<exp>/STOP`` (``touch`` from a terminal, also during
``make run``). At the end of the next optimiser step the Trainer saves a complete checkpoint and
stops; stage 03 then saves the adapter as trained so far and records the stop, and the next run
(``train.resume: auto``) continues from that checkpoint. A second interrupt stops at once.

Why the kernel's interrupt and not a widget button: a click on a widget reaches the kernel as a
message it reads only between cells, and the training cell is still running. jupyter-ui-poll lets
such messages through during a cell, but on ipykernel 7 they stay queued (measured here with
ipykernel 7.4 in JupyterLab 4.6; its issue #54); an interrupt is a signal, which every front end
(JupyterLab, VS Code, Colab) sends and the kernel receives at once.

The live view (interactive sessions only) plots train and validation loss and the learning rate as
they are logged, with tokens/s and the ETA.
"""

from __future__ import annotations

import contextlib
import io
import logging
import signal
import threading
import time
from pathlib import Path

from transformers import TrainerCallback

from ftkit.core.progress import duration, eta

log = logging.getLogger("ftkit")


class StopOnRequest(TrainerCallback):
    """Ends training at the next step end with a checkpoint when ``stop_file`` exists."""

    def __init__(self, stop_file: Path):
        self.stop_file = Path(stop_file)
        self.stopped_at: int | None = None
        self.interrupted = False

    @contextlib.contextmanager
    def catching_interrupts(self):
        """While training: the first SIGINT (a kernel interrupt) requests a clean stop, a second one
        raises KeyboardInterrupt as usual. Only the main thread can own a signal handler."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.getsignal(signal.SIGINT)

        def interrupted(signum, frame):
            if self.interrupted:  # the second interrupt: stop now
                signal.signal(signal.SIGINT, previous)
                raise KeyboardInterrupt
            self.interrupted = True
            print("interrupt: training stops at the end of this step, with a checkpoint "
                  "(interrupt again to stop at once, without one)", flush=True)

        signal.signal(signal.SIGINT, interrupted)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.stop_file.unlink(missing_ok=True)  # a request left from an earlier run is not this run's

    def _requested(self, args, state) -> bool:
        wanted = self.interrupted or self.stop_file.exists()
        if args.world_size <= 1:
            return wanted
        # every process must stop at the same step (or the others wait for it forever): they agree on
        # it at logging steps, where the Trainer synchronises anyway, not at every step
        if state.global_step % max(args.logging_steps, 1):
            return False
        import torch
        import torch.distributed as dist

        flag = torch.tensor([int(wanted)], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step < state.max_steps and self._requested(args, state):
            if state.is_world_process_zero:
                self.stop_file.unlink(missing_ok=True)
            self.stopped_at = state.global_step
            control.should_save = True  # a complete checkpoint the next run resumes from
            control.should_training_stop = True
            log.info("stop requested: checkpoint at step %d of %d, then stopping", state.global_step, state.max_steps)
        return control


class LiveView(TrainerCallback):
    """Loss and learning-rate curves, tokens/s and the ETA, updated as training runs, and how to stop.

    ``display``: how the widget is shown (IPython's display by default; tests pass a no-op)."""

    def __init__(self, stop_file: Path, display=None, redraw_seconds: float = 2.0):
        import ipywidgets as w

        self.stop_file = Path(stop_file)
        self._display = display
        self.redraw_seconds = redraw_seconds
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []
        self.lr: list[tuple[int, float]] = []
        self.stats = w.HTML("training starts...")
        self.stats.add_class("ftkit-live-stats")
        self.plot = w.Image(format="png")
        self.hint = w.HTML("<b>Stop</b>: interrupt the kernel (the notebook's Interrupt button, or I, I): training "
                           "ends at the next step with a checkpoint the next run resumes from")
        self.widget = w.VBox([self.stats, self.plot, self.hint])
        self.widget.add_class("ftkit-live")
        self._last_draw = 0.0
        self._start = None

    # Trainer events ----------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()
        self._first_step = state.global_step
        if self._display is None:
            from IPython.display import display

            display(self.widget)
        else:
            self._display(self.widget)

    def on_step_end(self, args, state, control, **kwargs):
        self._stats(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.train.append((state.global_step, float(logs["loss"])))
        if "eval_loss" in logs:
            self.val.append((state.global_step, float(logs["eval_loss"])))
        if "learning_rate" in logs:
            self.lr.append((state.global_step, float(logs["learning_rate"])))
        if time.perf_counter() - self._last_draw >= self.redraw_seconds:
            self.draw()

    def on_train_end(self, args, state, control, **kwargs):
        self.draw()
        self._stats(state, done=True)
        self.hint.value = ""

    # drawing -----------------------------------------------------------------------------------
    def _stats(self, state, done: bool = False) -> None:
        elapsed = time.perf_counter() - (self._start or time.perf_counter())
        left = eta(elapsed, state.global_step - self._first_step, state.max_steps - self._first_step)
        tokens = getattr(state, "num_input_tokens_seen", 0) or 0
        loss = f" · loss {self.train[-1][1]:.4f}" if self.train else ""
        val = f" · val {self.val[-1][1]:.4f}" if self.val else ""
        head = "finished" if done else "step"
        self.stats.value = (f"{head} {state.global_step}/{state.max_steps}{loss}{val} · "
                            f"{tokens / elapsed if elapsed else 0:,.0f} tokens/s · {duration(elapsed)} elapsed"
                            + ("" if done or left is None else f" · ETA {duration(left)}"))

    def draw(self) -> None:
        """Redraw the curves into the image widget (one PNG: no flicker, no growing output)."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure

        self._last_draw = time.perf_counter()
        fig = Figure(figsize=(8, 2.6), dpi=90)
        ax, ax_lr = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
        for series, label in ((self.train, "train loss"), (self.val, "validation loss")):
            if series:
                ax.plot(*zip(*series, strict=True), marker="o" if len(series) < 20 else None, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if self.train or self.val:
            ax.legend(loc="upper right")
        if self.lr:
            ax_lr.plot(*zip(*self.lr, strict=True), color="tab:green")
        ax_lr.set_xlabel("step")
        ax_lr.set_ylabel("learning rate")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        self.plot.value = buf.getvalue()


@contextlib.contextmanager
def watched(trainer, stop_file: Path, interactive: bool):
    """Training with a stop request honoured (the STOP file; in an interactive session a kernel
    interrupt too), and the live view when a person is looking. Yields the :class:`StopOnRequest`
    callback (its ``stopped_at`` says whether a stop ended the run)."""
    stop = StopOnRequest(stop_file)
    if interactive:
        from transformers.utils.notebook import NotebookProgressCallback

        from ftkit.train.progress import TrainingProgress

        # the live view shows what the Trainer's notebook bar and the terminal progress lines show
        trainer.remove_callback(NotebookProgressCallback)
        trainer.remove_callback(TrainingProgress)
        trainer.add_callback(LiveView(stop_file))
    trainer.add_callback(stop)
    if not interactive:
        yield stop
        return
    with stop.catching_interrupts():
        yield stop
