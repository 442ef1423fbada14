"""Progress lines for long loops: one plain-text line at a steady interval, and one at the end.

A line goes to stdout: ``ftkit run``'s terminal or log, or the cell in JupyterLab. In a headless
notebook (papermill under ``make run``, ``FTKIT_HEADLESS=1``) it goes to the terminal running ``make``
instead, through the kernel's own stdout, as the report's log lines do (``ftkit.report.mailable``):
the mailed report keeps no progress lines. It is plain text (no carriage return, no bar glyphs), so a
log file shows it as it is::

    04_evaluate: tuned replies 12/48 (25%) · 0.8 replies/s · 15s elapsed · ETA 45s

The interval is 30 s, or ``FTKIT_PROGRESS_SECONDS`` (0: every update, as the tests use). The first
update prints at once, so a user sees that a loop started and how fast it goes; an update that
completes the total leaves its line to the final one.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

INTERVAL_ENV = "FTKIT_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 30.0
SEP = " · "


def interval() -> float:
    """Seconds between two progress lines: ``$FTKIT_PROGRESS_SECONDS`` or 30."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    try:
        return max(float(raw), 0.0) if raw else DEFAULT_INTERVAL
    except ValueError:
        raise ValueError(f"{INTERVAL_ENV}={raw!r}: expected a number of seconds, e.g. 30") from None


def duration(seconds: float) -> str:
    """``42s``, ``2m10s``, ``1h05m``: short enough for a progress line."""
    s = max(int(round(seconds)), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def number(value: float) -> str:
    """A figure with about three significant digits: ``1.84``, ``412``, ``1,230``, ``1.8e-04``."""
    v = float(value)
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 0.01:
        return f"{v:.3g}"
    return f"{v:.1e}"


def figure(name: str, value) -> str:
    """``loss=1.84`` → ``loss 1.84``; a name ending in ``_per_s`` is a rate: ``tokens_per_s=412`` →
    ``412 tokens/s``; a string value is shown as it is."""
    shown = value if isinstance(value, str) else number(value)
    if name.endswith("_per_s"):
        return f"{shown} {name.removesuffix('_per_s').replace('_', ' ')}/s"
    return f"{name.replace('_', ' ')} {shown}"


def eta(elapsed: float, done: float, total: float) -> float | None:
    """Seconds left at the average pace so far; None before anything is done."""
    if done <= 0 or total is None:
        return None
    return max(total - done, 0) * elapsed / done


_terminals: dict[int, object] = {}


def terminal():
    """Where progress lines go: ``sys.stdout``, except in a headless notebook kernel, where it is the
    kernel's own stdout (ipykernel's ``fileno()`` is a copy of it, the pipe papermill's process passed
    on), so a line reaches the terminal at once and stays out of the report."""
    out = sys.stdout
    if os.environ.get("FTKIT_HEADLESS", "") in ("", "0") or not type(out).__module__.startswith("ipykernel"):
        return out
    try:
        fd = out.fileno()
        if fd not in _terminals:
            _terminals[fd] = open(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace")
        return _terminals[fd]
    except (OSError, ValueError, AttributeError):  # no descriptor behind it: the cell's stdout, then
        return out


def _print(line: str) -> None:
    stream = terminal()
    stream.write(line + "\n")
    stream.flush()  # at once: a kernel's stdout reaches papermill only when it flushes


class Progress:
    """Counts a loop's work and prints a progress line at most once per interval, plus a final line.

    ``unit`` names what is counted (``rows``, ``replies``, ``step``); ``initial`` is the count the
    loop starts from (a resumed training run), so the pace and the ETA cover this run's work only;
    ``rate=False`` leaves out the count's own rate (training shows tokens/s instead). Figures given
    to :meth:`update` (``loss=1.84``, ``tokens_per_s=412``; None is left out) are shown after the
    count. ``first_line=False``: no line at the first update, only after an interval (a loop that is
    often short and says enough in its final line); ``since``: the clock's time of the last line of
    the task this loop is part of, the interval counted from there. Thread-safe: the load test's clients update one
    Progress. Used as a context manager it prints the final line on the way out.
    """

    def __init__(self, label: str, total: int | None = None, *, unit: str = "", initial: int = 0,
                 rate: bool = True, every: float | None = None, first_line: bool = True,
                 since: float | None = None, clock: Callable[[], float] = time.monotonic,
                 write: Callable[[str], None] = _print):
        self.label, self.total, self.unit, self.rate = label, total, unit, rate
        self.count = self.initial = initial
        self.every = interval() if every is None else every
        self.clock, self.write = clock, write
        self.started = clock()
        self.figures: dict[str, object] = {}
        self.lines = 0
        self.finished = False
        # since: when the task this loop belongs to last printed (training, for its validation pass), so
        # the terminal is never silent for longer than the interval across the two
        self._last: float | None = since if since is not None else (None if first_line else self.started)
        self._lock = threading.Lock()

    @property
    def last_line_at(self) -> float | None:
        """The clock's time of the latest line printed (None: none yet)."""
        return self._last

    def update(self, n: int = 1, **figures) -> None:
        """``n`` more done; prints when the interval has passed since the last line (or none was printed)."""
        self.set(self.count + n, **figures)

    def set(self, count: int, **figures) -> None:
        """The count is now ``count`` (training reports its global step); prints when due."""
        with self._lock:
            self.count = count
            self.figures.update(figures)
            now = self.clock()
            if self.finished or (self._last is not None and now - self._last < self.every):
                return
            if self.total and count >= self.total:
                return  # all done: the final line (done()) says it, with the duration
            self._last = now
            self._emit(self.line(now))

    def done(self, outcome: str = "done in", **figures) -> None:
        """The final line, once: the count reached, the figures, and how long it took."""
        with self._lock:
            if self.finished:
                return
            self.finished = True
            self.figures.update(figures)
            self._emit(self.line(self.clock(), final=outcome))

    def line(self, now: float, final: str | None = None) -> str:
        elapsed = now - self.started
        head = f"{self.unit} {self.count:,}" if self.unit else f"{self.count:,}"
        if self.total:
            head += f"/{self.total:,} ({int(100 * min(self.count / self.total, 1))}%)"
        parts = [f"{self.label}: {head}"]
        parts += [figure(k, v) for k, v in self.figures.items() if v is not None]
        done = self.count - self.initial
        if self.rate and done > 0 and elapsed > 0:
            parts.append(f"{number(done / elapsed)} {self.unit or 'items'}/s")
        if final:
            parts.append(f"{final} {duration(elapsed)}")
        else:
            parts.append(f"{duration(elapsed)} elapsed")
            left = eta(elapsed, done, self.total - self.initial) if self.total else None
            if left is not None:
                parts.append(f"ETA {duration(left)}")
        return SEP.join(parts)

    def _emit(self, line: str) -> None:
        self.lines += 1
        self.write(line)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # a generator closed early (a consumer's ``break`` out of :func:`track`) is an end, not an error
        ok = exc_type is None or issubclass(exc_type, GeneratorExit)
        self.done("done in" if ok else "stopped by an error after")


def track(items: Iterable, label: str, total: int | None = None, **kw) -> Iterator:
    """``items`` as they are, counted by a :class:`Progress` (total: ``len(items)`` when it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    with Progress(label, total, **kw) as progress:
        for item in items:
            yield item
            progress.update()


@contextmanager
def timed(label: str, *, every: float | None = None, clock: Callable[[], float] = time.monotonic,
          write: Callable[[str], None] = _print):
    """One step that cannot count its work (a subprocess, a merge): a line when it starts, one per
    interval while it runs (from a background thread, so a step that blocks still shows it is alive),
    and one when it ends, with its duration."""
    every = interval() if every is None else every
    started = clock()
    stop = threading.Event()
    write(f"{label}: started")

    def beat() -> None:
        while not stop.wait(max(every, 1.0)):  # at least a second apart, even when every=0
            write(f"{label}: running{SEP}{duration(clock() - started)} elapsed")

    beater = threading.Thread(target=beat, name=f"progress {label}", daemon=True)
    beater.start()
    try:
        yield
    except BaseException:
        stop.set()
        beater.join()
        write(f"{label}: stopped by an error after {duration(clock() - started)}")
        raise
    stop.set()
    beater.join()
    write(f"{label}: done in {duration(clock() - started)}")
