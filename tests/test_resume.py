"""Resume after SIGKILL: the run continues from the newest complete checkpoint and ends where an
uninterrupted run ends; a torn checkpoint is skipped with a warning."""

import json
import shutil
import signal
import subprocess
import sys
import time

import yaml

from ftkit.convert import conversion
from ftkit.core.config import load_config
from ftkit.core.paths import RunPaths
from ftkit.data import dataset as data

STEPS = 24  # checkpoints every 4; the run is killed after the one at step 8


def _params(root, steps=STEPS):
    return {"experiment": "r", "outputs_dir": str(root), "model": {"name": "tiny-random"},
            "data": {"demo_size": 120},
            "train": {"max_steps": steps, "batch_size": 8, "learning_rate": 5e-3, "save_steps": 4,
                      "save_total_limit": 3, "logging_steps": 1, "eval_steps": 0, "lora": {"dropout": 0.0}}}


def _losses(root):
    log = json.loads((RunPaths(root, "r").train_log).read_text())
    return {h["step"]: h["loss"] for h in log if "loss" in h}


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    cfg = load_config(_params(a))
    paths = RunPaths(a, "r")
    data.prepare(cfg.data, paths, cfg.seed)
    conversion.convert(cfg, paths, conversion.run_tokenizer(cfg, paths))
    shutil.copytree(a, b)
    for root in (a, b):
        (root / "params.yaml").write_text(yaml.safe_dump(_params(root)))

    full = subprocess.run([sys.executable, "-m", "ftkit", "train", str(a / "params.yaml")], capture_output=True,
                          text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]

    ckpts = RunPaths(b, "r").checkpoints_dir
    proc = subprocess.Popen([sys.executable, "-m", "ftkit", "train", str(b / "params.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (ckpts / "checkpoint-8" / "ftkit_checkpoint_complete.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint-8 before the run ended"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not RunPaths(b, "r").adapter_dir.exists(), "killed too late: the run had finished"
    done = max(int(d.name.split("-")[1]) for d in ckpts.glob("checkpoint-*"))
    torn = ckpts / f"checkpoint-{done + 4}"  # what a crash in the middle of a save leaves behind
    torn.mkdir()
    (torn / "adapter_model.safetensors").write_bytes(b"\0" * 10)

    resumed = subprocess.run([sys.executable, "-m", "ftkit", "train", str(b / "params.yaml")], capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"skipping torn checkpoint {torn}" in resumed.stderr
    metrics = json.loads(RunPaths(b, "r").metrics("03_train").read_text())
    assert metrics["resumed_from"].endswith(f"checkpoint-{done}") and metrics["steps"] == STEPS
    assert f"resuming from {ckpts / f'checkpoint-{done}'}" in resumed.stderr
    assert metrics["steps_this_run"] == STEPS - done  # continued, not silently restarted
    full_losses, resumed_losses = _losses(a), _losses(b)
    assert abs(resumed_losses[STEPS] - full_losses[STEPS]) < 1e-4, (resumed_losses[STEPS], full_losses[STEPS])
