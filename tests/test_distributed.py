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


def test_shipped_accelerate_templates_are_what_accelerate_reads(caplog):
    """Each template, read by accelerate's own launcher: the distributed type and sharding it asks for (FSDP2's
    plugin built from the environment accelerate would hand the processes); on CPU a template is not used,
    and the run says so rather than silently training another way."""
    import os

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    from ftkit.train.launch import TEMPLATES, accelerate_config_path, launch_command

    want = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed-zero2": "DEEPSPEED", "deepspeed-zero3": "DEEPSPEED"}
    for name in TEMPLATES:
        args = launch_command_parser().parse_args(["--config_file", str(accelerate_config_path(name)),
                                                   "--num_processes", "2", "x.py"])
        args, _, _ = _validate_launch_command(args)
        assert args.mixed_precision == "bf16", name
        assert bool(args.use_fsdp) == (want[name] == "FSDP") and bool(args.use_deepspeed) == (want[name] == "DEEPSPEED")
        if name.startswith("deepspeed"):
            assert args.zero_stage == int(name[-1])
        if name == "fsdp":
            env = prepare_multi_gpu_env(args)
            saved = dict(os.environ)
            try:
                os.environ.update(env)
                plugin = FullyShardedDataParallelPlugin()
            finally:
                os.environ.clear()
                os.environ.update(saved)
            assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    cfg = load_config(model={"device": "cpu"}, train={"num_processes": 2, "accelerate_config": "fsdp"})
    with caplog.at_level("WARNING", logger="ftkit"):
        cmd = launch_command(cfg, "train_config.yaml")
    assert "--config_file" not in cmd and "is not used on CPU" in caplog.text
