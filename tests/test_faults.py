"""Faults: ftkit killed at every write of a stage, a full disk, a notebook cell that fails.

The promise under test: nothing half-written is ever taken as complete. Each stage commits each output
by one rename and its done record (``outputs/<exp>/done/<stage>.json``, fingerprints of what it wrote)
last; a later stage refuses to start on an earlier one that has no done record or whose outputs changed,
naming the stage to rerun. ``tests/killer.py`` SIGKILLs ``ftkit run`` just before the K-th rename, so
every point of a stage's writing is reached exactly, not by a timer's luck.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from reliability import tally

ROOT = Path(__file__).resolve().parents[1]
KILLER = ROOT / "tests" / "killer.py"
EXP = "faults"
PARAMS = {"experiment": EXP, "model": {"name": "tiny-random"}, "data": {"path": "demo", "demo_size": 120},
          "train": {"max_steps": 4, "batch_size": 4, "eval_steps": 2, "logging_steps": 2, "max_eval_examples": 8},
          "evaluate": {"num_generations": 2, "max_new_tokens": 8},
          "host": {"min_stop_rate": 0.0, "consistency_max_tokens": 16, "gguf_types": ["q8_0"], "prompts": ["Hi"]}}

pytestmark = pytest.mark.reliability


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}


def ftkit(out: Path, params: Path, stages: str, *, kill: tuple[str, int] = ("*", 0), log: Path | None = None,
          seed: int | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``ftkit run PARAMS --stages STAGES`` in a fresh process, killed at the K-th commit matching PATTERN."""
    pattern, k = kill
    cmd = [sys.executable, str(KILLER), pattern, str(k), *(["--log", str(log)] if log else []), "--",
           "run", str(params), "--stages", stages, "--outputs-dir", str(out),
           *(["--override", f"seed={seed}"] if seed is not None else [])]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=_env())


def _params(tmp_path: Path, **changes) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({**PARAMS, **changes}), encoding="utf-8")
    return p


def _commits(out: Path, params: Path, stages: str, tmp_path: Path) -> list[str]:
    """The outputs ``stages`` commits, in order, from a run that is not killed."""
    log = tmp_path / f"commits-{stages}.txt"
    log.unlink(missing_ok=True)
    done = ftkit(out, params, stages, log=log)
    assert done.returncode == 0, done.stderr[-3000:]
    return log.read_text().split()


def _no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]


def _all_jsonl_whole(folder: Path) -> int:
    """Every JSONL file under ``folder`` parses to its last line (none was left half-written); their count."""
    files = [f for f in folder.rglob("*.jsonl") if ".work" not in f.parts]
    for f in files:
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as e:
                    raise AssertionError(f"{f}:{n}: half-written ({e})") from None
    return len(files)


def _killed_then_refused(out: Path, params: Path, stage: str, next_stages: str, k: int, seed: int) -> None:
    """Stage ``stage`` killed at its K-th commit (rerun with another seed, so its outputs change): no done
    record, no half-written file, and the next stage refuses with the stage to rerun, without a traceback."""
    number = stage[:2]
    killed = ftkit(out, params, number, kill=("*", k), seed=seed)
    assert killed.returncode == -9, (k, killed.returncode, killed.stderr[-2000:])
    run = out / EXP
    assert not (run / "done" / f"{stage}.json").exists(), f"killed at commit {k}, yet {stage} looks done"
    _all_jsonl_whole(run)
    refused = ftkit(out, params, next_stages)
    assert refused.returncode == 2, (k, refused.returncode, refused.stderr[-3000:])
    assert f"stage {stage} has not finished" in refused.stderr and f"make {number} EXP={EXP}" in refused.stderr
    _no_traceback(refused)


def _sweep(tmp_path: Path, stage: str, before: str | None, next_stages: str, every: bool) -> int:
    out, params = tmp_path / "out", _params(tmp_path)
    if before:
        assert ftkit(out, params, before).returncode == 0
    commits = _commits(out, params, stage[:2], tmp_path)
    assert commits[-1].endswith(f"done/{stage}.json")  # the done record is the last thing written
    points = range(1, len(commits) + 1) if every else sorted({1, len(commits) // 2, len(commits)})
    for k in points:
        _killed_then_refused(out, params, stage, next_stages, k, seed=100 + k)
    # a rerun redoes the stage in full: every record accounted for, nothing temporary left behind
    again = ftkit(out, params, stage[:2])
    assert again.returncode == 0, again.stderr[-3000:]
    assert not list((out / EXP).rglob(".*.tmp"))
    if stage == "01_data_prep":
        m = json.loads((out / EXP / "metrics" / f"{stage}.json").read_text())
        assert m["rows_in"] == m["rows_kept"] + m["rows_quarantined"] > 0
    tally("faults", faults=len(points), crashes=0)
    return len(points)


def test_stage_01_killed_while_writing_is_redone_not_taken(tmp_path):
    assert _sweep(tmp_path, "01_data_prep", None, "02", every=False) == 3


def test_stage_02_killed_while_writing_is_redone_not_taken(tmp_path):
    assert _sweep(tmp_path, "02_format_conversion", "01", "03", every=False) == 3


@pytest.mark.slow
@pytest.mark.parametrize("stage,before,after", [("01_data_prep", None, "02"), ("02_format_conversion", "01", "03")])
def test_every_write_of_stages_01_and_02_killed(tmp_path, stage, before, after):
    assert _sweep(tmp_path, stage, before, after, every=True) >= 6


def test_an_earlier_stage_rerun_makes_the_later_one_stale(tmp_path):
    """Stage 02 done, then stage 01 redone with another seed: stage 03 refuses 02's tokens (they were made
    from splits that no longer exist) instead of training on them."""
    out, params = tmp_path / "out", _params(tmp_path)
    assert ftkit(out, params, "01-02").returncode == 0
    assert ftkit(out, params, "01", seed=7).returncode == 0
    refused = ftkit(out, params, "03")
    assert refused.returncode == 2 and "ran on outputs of 01_data_prep that were written again" in refused.stderr
    _no_traceback(refused)
    edited = out / EXP / "data" / "train.jsonl"  # a split changed by hand after stage 01: named
    assert ftkit(out, params, "02").returncode == 0
    edited.write_text(edited.read_text() + "\n" + edited.read_text().splitlines()[0] + "\n")
    refused = ftkit(out, params, "03")
    assert refused.returncode == 2 and f"{edited}:" in refused.stderr and "since stage 01_data_prep finished" in refused.stderr
    tally("faults", faults=2, crashes=0)


@pytest.mark.slow
def test_merge_and_gguf_killed_leave_nothing_half_written(tmp_path):
    """Stage 05 killed as it puts merged/ in place, then as it puts the GGUF file in place: no half-written
    model directory or GGUF is left where ``ftkit serve`` or a report would take it, and a rerun finishes."""
    out, params = tmp_path / "out", _params(tmp_path)
    assert ftkit(out, params, "01-03").returncode == 0
    run = out / EXP
    killed = ftkit(out, params, "05", kill=("merged", 1))
    assert killed.returncode == -9
    assert not (run / "merged").exists() and not (run / "done" / "05_host.json").exists()
    served = subprocess.run([sys.executable, "-m", "ftkit", "serve", str(run / "merged"), "--port", "0"],
                            capture_output=True, text=True, timeout=120, env=_env())
    assert served.returncode != 0 and "merged" in served.stderr
    _no_traceback(served)
    from ftkit.host import llama_cpp

    if not llama_cpp.available():
        pytest.skip("llama.cpp's converter not fetched (make thirdparty): the GGUF half needs it")
    killed = ftkit(out, params, "05", kill=("*.gguf", 1))
    assert killed.returncode == -9
    assert _servers_left(run) == []  # the server stage 05 had started goes with it
    assert (run / "merged" / "config.json").exists() and not list((run / "exports").glob("*.gguf"))
    assert not (run / "metrics" / "05_host.json").exists() and not (run / "done" / "05_host.json").exists()
    finished = ftkit(out, params, "05")
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert list((run / "exports").glob("*.gguf")) and (run / "done" / "05_host.json").exists()
    assert not list(run.rglob(".*.tmp"))
    tally("faults", faults=2, crashes=0)


def _servers_left(run: Path, wait_s: float = 20.0) -> list[str]:
    """Command lines of ``ftkit serve`` processes still serving from ``run`` after up to ``wait_s``."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        left = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                args = cmdline.read_bytes().split(b"\0")
            except OSError:
                continue
            if b"serve" in args and any(str(run).encode() in a for a in args):
                left.append(b" ".join(args).decode(errors="replace"))
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


# -- a full disk ---------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs: a real filesystem that fills up (root can mount one, as CI and this machine run)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): needs root")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with open(filler, "wb") as f:
        f.write(b"\0" * max(free - leave, 0))
    return filler


def test_disk_full_in_stage_01_names_the_path_and_keeps_the_earlier_splits(tmp_path, small_disk):
    out, params = small_disk / "out", _params(tmp_path)
    assert ftkit(out, params, "01").returncode == 0
    splits = {p: p.read_bytes() for p in (out / EXP / "data").glob("*.jsonl")}
    filler = _fill(small_disk, leave=8 << 10)
    full = ftkit(out, params, "01", seed=5)
    assert full.returncode == 2, full.stderr[-3000:]
    _no_traceback(full)
    assert "no space left on the disk" in full.stderr and str(out / EXP) in full.stderr and "needed" in full.stderr
    assert {p: p.read_bytes() for p in splits} == splits  # the earlier run's splits, byte for byte
    assert not list((out / EXP).rglob(".*.tmp"))
    filler.unlink()
    assert ftkit(out, params, "01", seed=5).returncode == 0
    tally("faults", faults=1, crashes=0)


def test_disk_full_before_a_merge_is_refused_up_front(tmp_path, small_disk, tiny_path):
    """Saving a model checks the space first: a clear error with the bytes needed, the old folder intact."""
    from ftkit.core.config import ModelConfig
    from ftkit.core.files import DiskFullError
    from ftkit.core.modeling import load_model, load_tokenizer
    from ftkit.host.merge import save_model_dir

    model, tok = load_model(tiny_path, ModelConfig(name="tiny-random")), load_tokenizer(tiny_path)
    target = small_disk / "merged"
    target.mkdir()
    (target / "config.json").write_text("{}")
    _fill(small_disk, leave=64 << 10)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weights > 64 << 10
    with pytest.raises(DiskFullError) as e:
        save_model_dir(model, tok, target)
    assert str(target) in str(e.value) and "needed" in str(e.value) and "free" in str(e.value)
    assert [p.name for p in target.iterdir()] == ["config.json"] and not list(small_disk.glob(".*.tmp"))
    tally("faults", faults=1, crashes=0)


def test_disk_full_at_a_checkpoint_names_it_and_the_torn_one_is_never_resumed(tmp_path):
    disk = tmp_path / "disk16"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here: needs root")
    try:
        out, params = disk / "out", _params(tmp_path, train={**PARAMS["train"], "save_steps": 2})
        assert ftkit(out, params, "01-02").returncode == 0
        filler = _fill(disk, leave=300 << 10)
        full = ftkit(out, params, "03")
        assert full.returncode == 2, full.stderr[-3000:]
        _no_traceback(full)
        assert "no space left on the disk" in full.stderr and str(out / EXP / "checkpoints") in full.stderr
        assert "needed" in full.stderr
        filler.unlink()
        again = ftkit(out, params, "03")
        assert again.returncode == 0, again.stderr[-3000:]
        m = json.loads((out / EXP / "metrics" / "03_train.json").read_text())
        assert m["resumed_from"] is None and m["steps"] == 4  # the torn checkpoint was not taken
        tally("faults", faults=1, crashes=0)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
def test_a_failing_cell_stops_make_keeps_the_partial_notebook_and_the_rerun_resumes_there(tmp_path, tiny_path):
    """Stage 02's model folder goes missing (a disk unmounted, a path renamed): its cell fails, make stops
    non-zero with the failed notebook kept as NN.partial.ipynb, and once the folder is back a rerun
    continues at stage 02 (stage 01's report is not rebuilt)."""
    from conftest import run_make

    model = tmp_path / "model"
    shutil.copytree(tiny_path, model)
    params = _params(tmp_path, model={"name": str(model)})
    out = tmp_path / "out"
    make = ("EXP=faults", f"PARAMS={params}", f"OUTPUTS={out}")
    assert run_make("01", *make).returncode == 0
    reports = out / EXP / "reports"
    first = (reports / "01_data_prep.ipynb").stat().st_mtime_ns
    model.rename(tmp_path / "model.away")
    failed = run_make("run", *make, env_extra={"HF_HUB_OFFLINE": "1"})
    assert failed.returncode != 0
    partial = reports / "02_format_conversion.partial.ipynb"
    assert partial.exists() and not (reports / "02_format_conversion.ipynb").exists()
    errors = [o for c in json.loads(partial.read_text())["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert errors and str(model) in json.dumps(errors)  # the failed cell, its error naming the folder
    assert not (out / EXP / "done" / "02_format_conversion.json").exists()
    (tmp_path / "model.away").rename(model)
    resumed = run_make("02", *make)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (reports / "01_data_prep.ipynb").stat().st_mtime_ns == first  # not from scratch
    assert (reports / "02_format_conversion.ipynb").exists() and not partial.exists()
    assert (out / EXP / "done" / "02_format_conversion.json").exists()
    tally("faults", faults=1, crashes=0)
