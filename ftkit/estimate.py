"""Rough estimates of training time, memory and hosted-API cost, before any weight is loaded.

Parameter counts come from the model config on the ``meta`` device (no weights read). Memory:
weights at their dtype, LoRA parameters with gradients and two AdamW moments in fp32, and
activations per layer after Korthikanti et al. (2022), ``s·b·h·(34 + 5·a·s/h)`` bytes at 16-bit
(doubled at fp32). Time: ``4·N·T`` FLOPs for LoRA (forward plus activation gradients) at a share of the
matrix-multiply rate measured on this device just now: 25% on CPU (calibrated on the demo: SmolLM2-135M
LoRA measured 124 tokens/s on 2 cores) and 40% on GPU. These are estimates to plan with;
stage 03 reports the measured figures.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch


@dataclass
class Estimate:
    parameters: int
    trainable_parameters: int
    train_tokens: int
    weights_gb: float
    trainable_state_gb: float
    activations_gb: float
    total_gb: float
    device: str
    device_matmul_gflops: float
    est_train_seconds: float
    hosted_cost_usd: float

    def to_dict(self) -> dict:
        return asdict(self)


def count_parameters_from_config(model_path: str, target_modules="all-linear", r: int = 16) -> tuple[int, int, object]:
    """(total, LoRA-trainable, config) without loading weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    trainable = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
            short = name.rsplit(".", 1)[-1]
            if target_modules == "all-linear" or short in target_modules:
                trainable += r * (mod.in_features + mod.out_features)
    return total, trainable, config


def matmul_gflops(device: torch.device, n: int = 1024, repeats: int = 5) -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


def estimate(cfg, model_path: str, train_tokens_per_epoch: int, n_train: int, mean_len: float) -> Estimate:
    from .modeling import resolve_device, resolve_dtype

    t = cfg.train
    total, trainable, config = count_parameters_from_config(model_path, t.lora.target_modules, t.lora.r)
    device = resolve_device(cfg.model)
    bytes_per = torch.finfo(resolve_dtype(cfg.model, device)).bits // 8
    steps_per_epoch = max(1, -(-n_train // (t.batch_size * t.gradient_accumulation_steps)))
    steps = t.max_steps if t.max_steps > 0 else int(steps_per_epoch * t.epochs)
    tokens = int(min(steps * t.batch_size * t.gradient_accumulation_steps * mean_len,
                     train_tokens_per_epoch * max(t.epochs, 1) if t.max_steps <= 0 else float("inf")))
    h = getattr(config, "hidden_size", 0)
    layers = getattr(config, "num_hidden_layers", 0)
    heads = getattr(config, "num_attention_heads", 1)
    s = cfg.convert.max_seq_len
    act = layers * s * t.batch_size * h * (34 + 5 * heads * s / max(h, 1)) * (bytes_per / 2)
    gflops = matmul_gflops(device)
    efficiency = 0.25 if device.type == "cpu" else 0.4
    secs = 4 * total * tokens / (efficiency * gflops * 1e9) if gflops else float("nan")
    gb = 1024**3
    weights, state = total * bytes_per / gb, trainable * 16 / gb
    return Estimate(total, trainable, tokens, weights, state, act / gb, weights + state + act / gb, str(device),
                    gflops, secs, tokens / 1e6 * cfg.convert.hosted_price_per_million_tokens)


def for_run(cfg, result) -> Estimate:
    """The estimate for stage 02's result (train split token counts) and the configured model."""
    from .modeling import resolve_model_path

    lens = result.lengths["train"]
    mean = sum(lens) / max(len(lens), 1)
    return estimate(cfg, resolve_model_path(cfg.model.name), sum(lens), len(lens), mean)
