"""Stage 03 on one device (in the notebook's process) or many (``accelerate launch`` subprocess).

With ``train.num_processes > 1`` the resolved config is written to ``logs/train_config.yaml`` and
``accelerate launch --num_processes N [--config_file TEMPLATE] -m ftkit train`` runs it; its log
streams into the notebook, and the metrics come back through ``metrics/03_train.json``.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from importlib import resources
from pathlib import Path

import yaml

from ftkit.core.paths import RunPaths

TEMPLATES = ("ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3")
log = logging.getLogger("ftkit")


def accelerate_config_path(spec: str) -> Path:
    if spec in TEMPLATES:
        return Path(str(resources.files("ftkit").joinpath(f"resources/accelerate/{spec}.yaml")))
    p = Path(spec).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"train.accelerate_config: {spec!r} is neither a template ({', '.join(TEMPLATES)}) "
                                "nor an existing file")
    return p


def launch_command(cfg, config_file: Path) -> list[str]:
    from ftkit.core.modeling import resolve_device

    t = cfg.train
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(t.num_processes)]
    if resolve_device(cfg.model).type == "cpu":  # torchrun processes with gloo (accelerate's --cpu runs one)
        if t.accelerate_config:
            # accelerate sets up FSDP and DeepSpeed only on accelerators: on a CPU-only machine a config
            # asking for them runs independent, undistributed processes (checked with accelerate 1.16)
            log.warning("train.accelerate_config: %s is not used on CPU: the %d processes run as DDP over gloo "
                        "(accelerate shards with FSDP or DeepSpeed only on GPUs)", t.accelerate_config, t.num_processes)
        cmd += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    elif t.accelerate_config:
        cmd += ["--config_file", str(accelerate_config_path(t.accelerate_config))]
    else:
        cmd += ["--multi_gpu", "--num_machines", "1", "--dynamo_backend", "no"]
    return cmd + ["-m", "ftkit", "train", str(config_file)]


def train(cfg, paths: RunPaths) -> dict:
    """Run stage 03; returns its metrics."""
    if cfg.train.num_processes <= 1:
        from ftkit.train.training import train as train_here

        return train_here(cfg, paths)
    config_file = paths.launch_config
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))
    cmd = launch_command(cfg, config_file)
    print("$", " ".join(cmd), flush=True)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"accelerate launch exited with {proc.returncode}; the log above says why")
    return paths.read_metrics("03_train")
