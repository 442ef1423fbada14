"""Each training method on the tiny model: it trains what it should, and its output reloads."""

import json

import pytest
import torch
from conftest import EXACT_MODEL

from ftkit.core.config import load_config
from ftkit.core.paths import RunPaths


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_converted):
    from conftest import copy_run

    root = tmp_path_factory.mktemp("methods")
    copy_run(tiny_converted, root, "m")
    return root


def _train(root, **train):
    from ftkit.train.training import run_training

    cfg = load_config(experiment="m", outputs_dir=str(root), model=EXACT_MODEL,
                      train={"max_steps": 6, "batch_size": 4, "learning_rate": 1e-2, "eval_steps": 0, "logging_steps": 1,
                             "resume": "never", **train})
    trainer, metrics = run_training(cfg, RunPaths(root, "m"))
    return cfg, trainer, metrics


@pytest.mark.parametrize("method,extra", [("dora", {}), ("lora", {"lora": {"rslora": True, "modules_to_save": ["lm_head"]}}),
                                          ("full", {"learning_rate": 1e-3})])
def test_method_trains_and_reloads(base_dir, method, extra):
    from ftkit.core.trained import load_adapter_model

    cfg, trainer, metrics = _train(base_dir, method=method, **extra)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    model = trainer.model
    if method == "full":
        assert metrics["trainable_params"] == metrics["total_params"]
    else:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        if method == "dora":
            assert any("lora_magnitude_vector" in n for n in names)
        if extra.get("lora", {}).get("modules_to_save"):
            assert any("lm_head" in n and "modules_to_save" in n for n in names)
            assert model.peft_config["default"].use_rslora
    info = json.loads((RunPaths(base_dir, "m").adapter_dir / "ftkit_train.json").read_text())
    assert info["method"] == method
    reloaded, _ = load_adapter_model(cfg, RunPaths(base_dir, "m"))
    ids = torch.tensor([[1, 4093, 198, 9576, 314, 957, 2]])
    with torch.no_grad():
        assert torch.allclose(model.eval()(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-4)


def test_qlora_on_cpu(base_dir):
    """4-bit NF4 base with double quantisation through bitsandbytes' CPU backend; LoRA on top."""
    import bitsandbytes as bnb

    cfg, trainer, metrics = _train(base_dir, method="qlora")
    model = trainer.model
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    q = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)).weight.quant_state
    assert q.quant_type == "nf4" and q.nested  # double quantisation
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0] and all(torch.isfinite(torch.tensor(losses)))


def test_completion_objective_trains_every_token(base_dir):
    from ftkit.train.trainer import load_tokens

    rows = load_tokens(RunPaths(base_dir, "m").tokens("train"), 3, objective="completion")
    for r in rows:
        assert r["labels"][1:] == r["input_ids"][1:] and r["labels"][0] == -100


def test_preflight_stops_a_run_that_cannot_fit(base_dir):
    from ftkit.core.estimate import PreflightError, preflight

    cfg = load_config(experiment="m", outputs_dir=str(base_dir), model=EXACT_MODEL,
                      convert={"max_seq_len": 1024}, train={"batch_size": 4})
    plan = preflight(cfg, RunPaths(base_dir, "m"))
    assert plan["parameters"] > 3_000_000 and 0 < plan["trainable_parameters"] < plan["parameters"]
    with pytest.raises(PreflightError, match=r"but cpu has 0.0 GB free. Try: train.method: qlora.*"
                                             r"train.batch_size: 1 with train.gradient_accumulation_steps: 4 "
                                             r"\(same effective batch\).*shorter convert.max_seq_len"):
        preflight(cfg, RunPaths(base_dir, "m"), free_bytes=10 * 1024**2)


def test_preflight_refuses_8b_full_fine_tune_on_24gb():
    """An 8B full fine-tune cannot fit a 24 GB device; the message says why and what to change."""
    import tempfile

    from transformers import LlamaConfig

    from ftkit.core.estimate import PreflightError, estimate
    with tempfile.TemporaryDirectory() as d:
        LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256).save_pretrained(d)
        cfg = load_config(model={"name": d}, train={"method": "full", "batch_size": 4, "max_steps": 10},
                          convert={"max_seq_len": 2048})
        est = estimate(cfg, d, 10_000_000, 10_000, 1000)
        assert 7.9e9 < est.parameters < 8.1e9 and est.trainable_parameters == est.parameters
        assert est.total_gb > 24
        from ftkit.core.estimate import check_fits
        with pytest.raises(PreflightError, match="train.method: qlora"):
            check_fits(est, cfg, free_bytes=24 * 1024**3)


def test_compiled_lora_estimate_keeps_fewer_activations():
    """Compiled LoRA layers are estimated at the measured ~40 B per token, layer and hidden unit (eager:
    100); DoRA and full fine-tuning, not measured compiled on a large shape, keep the eager figure."""
    import tempfile

    from transformers import LlamaConfig

    from ftkit.core.estimate import estimate
    with tempfile.TemporaryDirectory() as d:
        LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=1000).save_pretrained(d)
        for method, saved_per_unit in (("lora", 100 - 40), ("dora", 0), ("full", 0)):
            cfg = load_config(model={"name": d}, train={"method": method, "batch_size": 8, "max_steps": 10})
            eager, comp = (estimate(cfg, d, 100_000, 1000, 100, compiled=c) for c in (False, True))
            scale = 2 if eager.weights_gb * 1024**3 > 3 * eager.parameters else 1  # fp32 (CPU) doubles it
            # 8 examples x 100 tokens x 4 layers x 256 hidden units
            assert eager.activations_gb - comp.activations_gb == pytest.approx(
                8 * 100 * 4 * 256 * saved_per_unit * scale / 1024**3, abs=1e-9)
            assert comp.weights_gb == eager.weights_gb and comp.trainable_state_gb == eager.trainable_state_gb


def test_qlora_gradients_equal_dequantised_model():
    """Through bitsandbytes' CPU backend, LoRA gradients on the 4-bit base equal those on an fp32 model
    holding the dequantised weights (the 4-bit path's backward is right, not just finite)."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ftkit.core.modeling import resolve_model_path

    path = resolve_model_path("tiny-random")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    q = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32,
                                             device_map={"": "cpu"})
    f = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for name, mod in q.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            f.get_submodule(name).weight.data = bnb.functional.dequantize_4bit(mod.weight.data,
                                                                               mod.weight.quant_state).float()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    grads = []
    for model in (q, f):
        torch.manual_seed(0)
        peft_model = get_peft_model(model, lora).train()
        ids = torch.tensor([[1, 4093, 198, 9576, 314, 957, 1686, 2, 198, 1, 520, 9531, 198, 33, 34, 35]])
        peft_model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads.append({n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad})
    for name, g in grads[1].items():
        assert torch.allclose(grads[0][name], g, rtol=1e-4, atol=1e-6), name
