"""Two-process DDP on CPU (gloo) through `accelerate launch`, as the notebook runs it."""

import json

from ftkit.convert import conversion
from ftkit.core.config import load_config
from ftkit.core.files import read_json
from ftkit.core.paths import RunPaths
from ftkit.data import dataset as data


def test_two_process_ddp_on_cpu(tmp_path):
    from ftkit.train.launch import train

    cfg = load_config(experiment="ddp", outputs_dir=str(tmp_path), model={"name": "tiny-random", "device": "cpu"},
                      data={"demo_size": 120},
                      train={"num_processes": 2, "max_steps": 10, "batch_size": 4, "learning_rate": 1e-2,
                             "eval_steps": 0, "logging_steps": 1, "lora": {"dropout": 0.0}})
    paths = RunPaths(tmp_path, "ddp")
    data.prepare(cfg.data, paths, cfg.seed)
    conversion.convert(cfg, paths, conversion.run_tokenizer(cfg, paths))
    metrics = train(cfg, paths)
    assert metrics["steps"] == 10
    ranks = [read_json(paths.root / "logs" / f"rank{r}.json") for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["trainable_sum"] == ranks[1]["trainable_sum"]  # DDP keeps the replicas identical
    assert ranks[0]["trainable_abs_sum"] > 0
    log = json.loads(paths.train_log.read_text())
    losses = [h["loss"] for h in log if "loss" in h]
    assert losses[-1] < losses[0]
