"""The embedded real model (SmolLM2-135M-Instruct) learns the demo voice; the full demo behind `slow`."""

import json

import pytest
from conftest import run_make

from ftkit import conversion, data
from ftkit.config import load_config
from ftkit.evaluate import adapter_disabled, heldout_loss
from ftkit.paths import RunPaths
from ftkit.train import load_tokens, run_training


def test_real_model_held_out_loss_falls(tmp_path):
    cfg = load_config(experiment="real", outputs_dir=str(tmp_path), data={"demo_size": 300},
                      train={"max_steps": 10, "batch_size": 4, "learning_rate": 1e-3, "eval_steps": 0,
                             "logging_steps": 5})
    paths = RunPaths(cfg.outputs_dir, cfg.experiment)
    data.prepare(cfg.data, paths, cfg.seed)
    tok = conversion.run_tokenizer(cfg, paths)
    conversion.convert(cfg, paths, tok)
    trainer, _ = run_training(cfg, paths)
    model = trainer.model.eval()
    rows = load_tokens(paths.tokens("test"), 24)
    tuned = heldout_loss(model, rows, tok.pad_token_id)
    with adapter_disabled(model):
        base = heldout_loss(model, rows, tok.pad_token_id)
    assert tuned["loss"] < 0.8 * base["loss"], (base, tuned)


@pytest.mark.slow
def test_demo_acceptance(tmp_path):
    """`make run` on the demo: tuned loss >= 20% below base, clearly more house-voice passes."""
    proc = run_make("run", "EXP=demo", f"OUTPUTS={tmp_path}", timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = json.loads((tmp_path / "demo" / "metrics" / "04_evaluate.json").read_text())
    assert m["tuned"]["loss"] <= 0.8 * m["base"]["loss"]
    assert m["tuned"]["rule_pass_rate"] >= m["base"]["rule_pass_rate"] + 0.3
    assert m["tuned"]["stop_rate"] >= 0.9
