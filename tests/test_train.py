"""Training on the tiny model: loss falls, LoRA weights change, the saved adapter reloads exactly."""

import pytest
import torch
from conftest import EXACT_MODEL

from ftkit.convert import conversion
from ftkit.core.config import load_config
from ftkit.core.paths import RunPaths
from ftkit.data import dataset as data


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_converted):
    from conftest import TINY_DEMO_SIZE, copy_run

    from ftkit.train.training import run_training

    out = tmp_path_factory.mktemp("train")
    cfg = load_config(experiment="t", outputs_dir=str(out), model=EXACT_MODEL,
                      data={"demo_size": TINY_DEMO_SIZE},
                      train={"max_steps": 16, "batch_size": 4, "learning_rate": 5e-3, "eval_steps": 8,
                             "logging_steps": 2, "max_eval_examples": 8, "lora": {"dropout": 0.0}})
    paths = copy_run(tiny_converted, out, cfg.experiment)
    trainer, metrics = run_training(cfg, paths)
    return cfg, paths, trainer, metrics


def test_loss_falls(trained):
    _, _, trainer, metrics = trained
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert metrics["steps"] == 16
    assert losses[-1] < losses[0] - 0.05, losses
    # no host sync per micro-batch: a nan/inf loss is logged as it is, not hidden by the Trainer's filter
    assert trainer.args.logging_nan_inf_filter is False


def test_final_validation_reuses_the_last_step_evaluation(trained):
    """eval_steps divides max_steps: the Trainer evaluated the final weights already, and the metrics
    take that figure (not a second pass over the same rows), which a fresh evaluation reproduces."""
    _, _, trainer, metrics = trained
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [8, 16]
    assert metrics["eval_loss"] == evals[-1]["eval_loss"]
    assert metrics["eval_loss"] == pytest.approx(trainer.evaluate()["eval_loss"], rel=1e-5)


def test_lora_weights_changed_and_base_frozen(trained):
    _, _, trainer, _ = trained
    named = dict(trainer.model.named_parameters())
    lora_b = [n for n in named if "lora_B" in n]
    assert lora_b, "no LoRA parameters found"
    for n in lora_b:  # B starts at zero in LoRA
        assert named[n].abs().sum() > 0, f"Parameter {n} has not changed."
    assert all(not p.requires_grad for n, p in named.items() if "lora_" not in n)


def test_adapter_reload_matches(trained):
    from ftkit.core.trained import load_adapter_model

    cfg, paths, trainer, _ = trained
    model = trainer.model.eval()
    ids = torch.tensor([[1, 4093, 198, 9576, 314, 957, 1686, 2, 198, 1, 520, 9531, 198]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        reloaded, _ = load_adapter_model(cfg, paths)
        after = reloaded(input_ids=ids).logits
        with reloaded.disable_adapter():
            base = reloaded(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-5)
    assert not torch.allclose(base, after, atol=1e-4), "adapter has no effect"


def test_adapter_records_its_base(trained):
    from ftkit.core.trained import load_adapter_model

    cfg, paths, _, _ = trained
    wrong = load_config(experiment="t", outputs_dir=cfg.outputs_dir, model={"name": "some/other-model"})
    with pytest.raises(ValueError, match="was trained on 'tiny-random'"):
        load_adapter_model(wrong, paths)


def test_metrics_keys_and_logs(trained):
    _, paths, _, metrics = trained
    for key in ("train_loss", "eval_loss", "train_tokens", "tokens_per_second", "peak_memory_mb", "trainable_params",
                "total_params", "runtime_s"):
        assert metrics[key] is not None and metrics[key] > 0, key
    assert metrics["train_tokens"] > 16 * 4 * 50  # 16 steps x 4 examples of > 50 tokens, no padding counted
    assert paths.train_log.with_suffix(".csv").read_text().startswith("epoch,")
    # the steady run below does not overfit, and the check says what it looked at
    assert metrics["overfitting"]["flag"] is False and metrics["overfitting"]["reason"]
    # the stage's peak is the larger of loading and training (CPU: the process's peak resident memory)
    assert 0 < metrics["load_peak_memory_mb"] <= metrics["peak_memory_mb"]


def test_leftovers_of_an_earlier_run_are_freed_before_loading():
    """A finished model caught in a reference cycle (Liger's bound methods, a Params4bit pointing back at
    its layer, a notebook's own objects) is collected before the next run loads its weights."""
    import gc
    import weakref

    from ftkit.train.loading import free_leftovers

    gc.disable()
    try:
        old = torch.nn.Linear(64, 64)
        old.me = [old]  # a cycle: only a garbage collection frees it
        alive = weakref.ref(old)
        del old
        assert alive() is not None
        assert free_leftovers(torch.device("cpu")) is None  # CPU: nothing to report
        assert alive() is None
    finally:
        gc.enable()


def test_overfitting_flag():
    from ftkit.train.history import overfitting

    history = [{"step": s, "loss": 3 - 0.1 * s} for s in range(1, 11)]
    rising = history + [{"step": s, "eval_loss": v} for s, v in ((2, 2.0), (4, 1.8), (6, 1.9), (8, 2.1))]
    assert overfitting(rising)["flag"] and "best val loss 1.8000 at step 4" in overfitting(rising)["reason"]
    falling = history + [{"step": s, "eval_loss": v} for s, v in ((2, 2.0), (4, 1.8), (6, 1.7), (8, 1.6))]
    assert not overfitting(falling)["flag"]
    assert overfitting(rising[:12])["reason"] == "fewer than 3 evaluations"


def test_gradient_checkpointing_trains_and_is_on(tmp_path):
    """The path QLoRA takes on a GPU by default: checkpointed layers, adapters still learning."""
    from ftkit.train.training import run_training

    cfg = load_config(experiment="ck", outputs_dir=str(tmp_path), model=EXACT_MODEL,
                      data={"demo_size": 60},
                      train={"max_steps": 6, "batch_size": 4, "learning_rate": 5e-3, "eval_steps": 0,
                             "logging_steps": 1, "gradient_checkpointing": True, "lora": {"dropout": 0.0}})
    paths = RunPaths(cfg.outputs_dir, cfg.experiment)
    data.prepare(cfg.data, paths, cfg.seed)
    conversion.convert(cfg, paths, conversion.run_tokenizer(cfg, paths))
    trainer, metrics = run_training(cfg, paths)
    assert trainer.model.base_model.model.is_gradient_checkpointing
    assert metrics["device_plan"]["gradient_checkpointing"] is True
    assert metrics["device_plan"]["applied_fused_lora_a"] > 0  # fused LoRA A products under recomputation too
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0], losses
