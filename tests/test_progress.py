"""Progress lines: the interval, the final line and the ETA (an injected clock); training prints them
with rising steps, loss and tokens/s; papermill --log-output streams them while the cell still runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftkit.core import progress as prog
from ftkit.core.progress import Progress, duration, eta, figure, number, timed, track


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def recorder(clock=None, **kw):
    lines: list[str] = []
    return lines, (lambda label, total=None, **more: Progress(label, total, clock=clock or Clock(),
                                                             write=lines.append, **{**kw, **more}))


def test_prints_first_update_then_at_most_once_per_interval():
    clock = Clock()
    lines, make = recorder(clock)
    p = make("04_evaluate: tuned", 10, unit="replies", every=30)
    clock.now += 2
    p.update()  # the first update prints at once: the user sees the loop started
    for _ in range(5):
        clock.now += 5
        p.update()  # 5..25 s after the first line: silent
    assert len(lines) == 1
    clock.now += 5  # 30 s after the first line
    p.update()
    assert len(lines) == 2 and p.count == 7
    assert lines[1].startswith("04_evaluate: tuned: replies 7/10 (70%) · ")
    clock.now += 1
    p.done()
    p.done()  # once only
    assert len(lines) == 3 and lines[2].endswith("· done in 33s")
    p.update()  # nothing after the final line
    assert len(lines) == 3


def test_every_zero_prints_every_update():
    lines, make = recorder()
    p = make("x", 4, every=0)
    for _ in range(3):
        p.update()
    assert len(lines) == 3


def test_the_last_item_leaves_its_line_to_the_final_one():
    lines, make = recorder()
    with make("loop", 4, every=0) as p:
        p.update(2)
        p.update(2)  # all done: the final line follows, one line not two alike
    assert [ln.split(" · ")[0] for ln in lines] == ["loop: 2/4 (50%)", "loop: 4/4 (100%)"] and "done in" in lines[-1]
    lines.clear()
    with make("one batch", 4, every=0) as p:
        p.update(4)
    assert len(lines) == 1 and lines[0].startswith("one batch: 4/4 (100%)") and "done in" in lines[0]


def test_eta_and_rate_from_the_pace_so_far():
    clock = Clock()
    lines, make = recorder(clock)
    p = make("04_evaluate: base loss", 40, unit="rows", every=0)
    clock.now += 20
    p.update(10)
    # 10 rows in 20 s: 0.5 rows/s, 30 rows left, 60 s
    assert lines[-1] == "04_evaluate: base loss: rows 10/40 (25%) · 0.5 rows/s · 20s elapsed · ETA 1m00s"
    assert eta(20, 10, 40) == 60
    assert eta(5, 0, 40) is None  # nothing done yet: no guess


def test_resumed_count_paces_this_runs_work_only():
    clock = Clock()
    lines, make = recorder(clock)
    p = make("03_train", 120, unit="step", initial=100, rate=False, every=0)
    clock.now += 10
    p.set(105, loss=1.8423, val=None, lr=1.8e-4, tokens_per_s=412.4)
    # 5 steps in 10 s, 15 left: 30 s (not the 100 steps of the earlier run); a None figure is left out
    assert lines[-1] == "03_train: step 105/120 (87%) · loss 1.84 · lr 1.8e-04 · 412 tokens/s · 10s elapsed · ETA 30s"


def test_lines_are_plain_text():
    clock = Clock()
    lines, make = recorder(clock)
    with make("02_format_conversion: train", 2, unit="records", every=0) as p:
        clock.now += 3725
        p.update(2, loss=12.345)
    assert lines[-1].endswith("· done in 1h02m") and "loss 12.3" in lines[-1]
    for line in lines:
        assert "\r" not in line and "\n" not in line
        assert all(ch.isascii() or ch == "·" for ch in line), line


def test_formatting():
    assert [duration(s) for s in (0, 42.4, 130, 3599, 3600, 7322)] == ["0s", "42s", "2m10s", "59m59s", "1h00m", "2h02m"]
    assert [number(v) for v in (0, 1.8423, 0.025, 412.4, 12345, 1.8e-4)] == ["0", "1.84", "0.025", "412", "12,345",
                                                                            "1.8e-04"]
    assert figure("tokens_per_s", 412) == "412 tokens/s" and figure("val", 1.91) == "val 1.91"
    assert figure("concurrency", "4") == "concurrency 4"


def test_interval_from_the_environment(monkeypatch):
    monkeypatch.delenv(prog.INTERVAL_ENV, raising=False)
    assert prog.interval() == 30
    monkeypatch.setenv(prog.INTERVAL_ENV, "0")
    assert prog.interval() == 0 and Progress("x").every == 0
    monkeypatch.setenv(prog.INTERVAL_ENV, "soon")
    with pytest.raises(ValueError, match="FTKIT_PROGRESS_SECONDS"):
        prog.interval()


def test_track_counts_items_and_ends_with_a_final_line():
    lines: list[str] = []
    items = list(track(range(4), "loop", unit="items", every=3600, write=lines.append))
    assert items == [0, 1, 2, 3]
    assert len(lines) == 2 and lines[0].startswith("loop: items 1/4") and lines[1].startswith("loop: items 4/4 (100%)")
    lines.clear()
    for i in track([1, 2, 3], "early", every=3600, write=lines.append):
        if i == 2:
            break  # a consumer that stops early ends the loop, it is no error
    assert lines[-1].startswith("early: 1/3") and "done in" in lines[-1]


def test_an_error_says_where_the_loop_stopped():
    lines: list[str] = []
    with pytest.raises(RuntimeError), Progress("loop", 5, every=3600, write=lines.append) as p:
        p.update(2)
        raise RuntimeError
    assert lines[-1].startswith("loop: 2/5 (40%)") and "stopped by an error after" in lines[-1]


def test_timed_step_prints_start_and_end_with_its_duration():
    clock = Clock()
    lines: list[str] = []
    with timed("05_host: GGUF q8_0 export", clock=clock, write=lines.append, every=3600):
        clock.now += 75
    assert lines == ["05_host: GGUF q8_0 export: started", "05_host: GGUF q8_0 export: done in 1m15s"]
    with pytest.raises(OSError), timed("05_host: merge", clock=clock, write=lines.append, every=3600):
        raise OSError
    assert lines[-1] == "05_host: merge: stopped by an error after 0s"


def test_timed_step_shows_it_is_alive_while_it_blocks():
    lines: list[str] = []
    with timed("sub", write=lines.append, every=0.2):  # heartbeats at least 1 s apart
        time.sleep(1.3)
    assert lines[0] == "sub: started" and lines[1].startswith("sub: running · ") and lines[-1].startswith("sub: done in")


LINE = re.compile(r"^03_train: step (\d+)/(\d+) \((\d+)%\) · (.*)$")


def test_a_validation_pass_keeps_the_interval_of_the_training_lines():
    """The demo's worst gap was 62 s with a 30 s interval: a step ending 29 s after the last line, then a
    31 s validation pass printing only at its end. Counted from the last training line, the pass
    prints once the interval is up."""
    from types import SimpleNamespace

    from ftkit.train.progress import TrainingProgress

    clock, lines = Clock(), []
    cb = TrainingProgress(every=30, clock=clock, write=lines.append)
    state = SimpleNamespace(is_world_process_zero=True, max_steps=100, global_step=0, num_input_tokens_seen=0)
    control = SimpleNamespace(should_log=False)
    cb.on_train_begin(None, state, control)
    state.global_step = 1
    cb.on_log(None, state, control, logs={"loss": 2.0, "learning_rate": 1e-4})
    assert len(lines) == 1
    clock.now += 29  # the next step ends just inside the interval, then validation starts
    state.global_step = 2
    cb.on_step_end(None, state, control)
    batches = [None] * 8
    for _ in batches:
        clock.now += 4
        cb.on_prediction_step(None, state, control, eval_dataloader=batches)
    assert len(lines) == 2 and "validation: batches" in lines[1]  # at 33 s, not at the pass's end (61 s)


def test_training_prints_progress_lines(tmp_path, tiny_converted, monkeypatch, capsys):
    """A short run on the tiny model, headless, FTKIT_PROGRESS_SECONDS=0: a line per step from the first
    logged one, steps rising, loss, learning rate and tokens/s parsable; no tqdm bar or log dicts."""
    from conftest import TINY_DEMO_SIZE, copy_run

    from ftkit.core.config import load_config
    from ftkit.train.training import run_training

    monkeypatch.setenv(prog.INTERVAL_ENV, "0")
    monkeypatch.setenv("FTKIT_HEADLESS", "1")
    cfg = load_config(experiment="p", outputs_dir=str(tmp_path), model={"name": "tiny-random"},
                      data={"demo_size": TINY_DEMO_SIZE},
                      train={"max_steps": 6, "batch_size": 4, "eval_steps": 3, "logging_steps": 2,
                             "max_eval_examples": 4, "save_steps": 0})
    trainer, _ = run_training(cfg, copy_run(tiny_converted, tmp_path, cfg.experiment))
    out, err = capsys.readouterr()
    sys.stdout.write(out)  # shown by pytest -rP
    lines = [m for m in (LINE.match(ln) for ln in out.splitlines()) if m]
    assert trainer.args.disable_tqdm and "/6 [" not in err and "{'loss'" not in out  # no training bar, no dicts

    steps = [int(m[1]) for m in lines]
    assert steps[0] == 1 and steps == sorted(steps) and steps[-1] == 6 and len(lines) >= 6, out
    assert {int(m[2]) for m in lines} == {6}
    for m in lines:
        figures = dict(f.split(" ", 1) for f in m[4].split(" · ") if not f.startswith(("ETA", "done")))
        assert float(figures["loss"]) > 0 and float(figures["lr"]) >= 0  # 0 at step 1: warm-up starts there
        assert float(m[4].split(" tokens/s")[0].rsplit(" ", 1)[-1].replace(",", "")) > 0
    assert "val" in lines[-1][4] and "done in" in lines[-1][4] and "ETA" in lines[1][4]
    # the validation passes at steps 3 and 6, a line each when they end; the final figure is step 6's
    # (eval_steps divides the steps), not a third pass over the same rows
    checks = [ln for ln in out.splitlines() if ln.startswith("03_train: validation: batches ")]
    assert len(checks) == 2 and all(re.search(r" · val \d+\.\d+ · (.* · )?done in \d+s$", ln) for ln in checks), checks


NOTEBOOK_CELL = """\
import time
from ftkit.core.progress import Progress
with Progress("term", 3, unit="items", every=0) as t, \\
        Progress("cell", 3, unit="items", every=0, write=print) as c:
    for _ in range(3):
        time.sleep(1.5)
        t.update()
        c.update()
"""


def test_lines_reach_the_terminal_while_the_cell_runs(tmp_path):
    """A notebook under papermill --log-output, headless as make runs it. The default lines ("term") go to
    the kernel's own stdout, papermill's stdout, and stay out of the notebook; lines printed into the
    cell ("cell") reach the terminal through --log-output, which logs each stream message as the kernel
    sends it (papermill's process_message). Both arrive 1.5 s apart, as printed, not at the cell's end."""
    import os
    import threading

    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(NOTEBOOK_CELL)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    src, out = tmp_path / "progress.ipynb", tmp_path / "out.ipynb"
    nbformat.write(nb, src)
    papermill = Path(sys.executable).parent / "papermill"
    # as make runs it; without pytest's variables, whose presence stops ipykernel redirecting its stdout
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}, "FTKIT_HEADLESS": "1"}
    proc = subprocess.Popen([str(papermill), str(src), str(out), "--log-output", "--no-progress-bar", "--cwd",
                             str(Path(__file__).resolve().parents[1])], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    arrivals: list[tuple[float, str]] = []

    def read(pipe):
        for line in pipe:
            arrivals.append((time.monotonic(), line.rstrip("\n")))

    readers = [threading.Thread(target=read, args=(p,)) for p in (proc.stdout, proc.stderr)]
    for r in readers:
        r.start()
    assert proc.wait(timeout=120) == 0
    for r in readers:
        r.join()
    ended = next(t for t, ln in arrivals if ln.startswith("Ending Cell 1"))
    for name in ("term", "cell"):
        shown = [(t, ln) for t, ln in arrivals if ln.startswith(f"{name}: items")]
        assert [ln.split(" (")[0] for _, ln in shown] == [f"{name}: items {k}/3" for k in (1, 2, 3)], arrivals
        gaps = [b - a for (a, _), (b, _) in zip(shown[:2], shown[1:3], strict=True)]
        assert all(g > 1.0 for g in gaps), (name, gaps)  # each line arrived when it was printed
        assert ended - shown[0][0] > 2.5, name  # the first line was in the terminal 3 s before the cell ended
    kept = "".join("".join(o.get("text", "")) for o in json.loads(out.read_text())["cells"][0]["outputs"])
    assert "cell: items 1/3" in kept and "term:" not in kept  # the headless lines stay out of the report
