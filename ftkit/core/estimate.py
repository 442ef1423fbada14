"""Rough estimates of training time, memory and hosted-API cost, before any weight is loaded.

Parameter counts come from the model config on the ``meta`` device (no weights read). Memory:
weights at their dtype (NF4 for QLoRA), LoRA parameters with gradients and two AdamW moments in
fp32 (full fine-tuning: gradients and moments for every weight), activations as a per-token,
per-layer, per-hidden-unit constant in the spirit of Korthikanti et al. (2022) but measured for
ftkit's methods (``bench/gpu_demo.py``), and the logits kept for the loss. Time: ``4·N·T`` FLOPs for LoRA (forward plus activation gradients) at a share of the
matrix-multiply rate measured on this device just now: 25% on CPU (calibrated on the demo: SmolLM2-135M
LoRA measured 124 tokens/s on 2 cores) and 40% on GPU of a 4096 x 4096 product in the training dtype (bf16):
what ftkit's eager GPU path reached on the Llama-3.1-8B shape (10,419 tokens/s, ~317 of ~790 TFLOP/s;
compiled layers ran 1.4x faster, micro-batches of a few hundred tokens run far slower). These are estimates to plan with;
stage 03 reports the measured figures.
"""

from __future__ import annotations

import dataclasses
import functools
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
    targets = target_modules if isinstance(target_modules, str) else tuple(target_modules)
    return _count_parameters(model_path, targets, r)


@functools.lru_cache(maxsize=32)  # the parameter form re-estimates on every change: the meta build once per model
def _count_parameters(model_path: str, target_modules, r: int) -> tuple[int, int, object]:
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


def matmul_gflops(device: torch.device, n: int = 1024, repeats: int = 7, dtype: torch.dtype = torch.float32) -> float:
    """The rate of an ``n`` x ``n`` matrix product in ``dtype`` on ``device``, GFLOP/s: the median of
    ``repeats`` timed products after two warm-up ones (a shared 2-core CPU varies between runs, so one
    product is not a rate). The operands come from a generator of their own: timing the device leaves
    the global one, which stage 03 has seeded for the adapter's initialisation, untouched."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    times = []
    for _ in range(2 + repeats):
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / sorted(times[2:])[repeats // 2] / 1e9


def estimate(cfg, model_path: str, train_tokens_per_epoch: int, n_train: int, mean_len: float,
             compiled: bool = False, timed: bool = True) -> Estimate:
    """``compiled``: the decoder layers run compiled (stage 03's GPU plan), which keeps fewer
    activations for LoRA; the pre-flight check leaves it off (the eager figure is the larger).
    ``timed``: time the device's matrix product for the time estimate; off, only memory is worked
    out (``gflops`` and ``seconds`` are NaN), for callers that choose by memory alone."""
    from ftkit.core.modeling import resolve_device, resolve_dtype

    t = cfg.train
    total, trainable, config = count_parameters_from_config(model_path, t.lora.target_modules, t.lora.r)
    device = resolve_device(cfg.model)
    dtype = resolve_dtype(cfg.model, device, full_precision=t.method == "full")  # what training computes in
    bytes_per = torch.finfo(dtype).bits // 8
    if t.method == "full":
        trainable = total
    steps_per_epoch = max(1, -(-n_train // (t.batch_size * t.gradient_accumulation_steps)))
    steps = t.max_steps if t.max_steps > 0 else int(steps_per_epoch * t.epochs)
    tokens = int(min(steps * t.batch_size * t.gradient_accumulation_steps * mean_len,
                     train_tokens_per_epoch * max(t.epochs, 1) if t.max_steps <= 0 else float("inf")))
    h = getattr(config, "hidden_size", 0)
    layers = getattr(config, "num_hidden_layers", 0)
    heads = getattr(config, "num_attention_heads", 1)
    vocab = getattr(config, "vocab_size", 0)
    # tokens in one micro-batch: packed rows hold just the examples; padded batches pad to the longest
    seq = mean_len if t.packing else min(cfg.convert.max_seq_len, 1.5 * mean_len)
    per_batch = t.batch_size * seq
    # bytes kept for backward per token, layer and hidden unit at 16-bit, measured on an H200 with a
    # SmolLM2-1.7B-shaped model (LoRA r=16 on all linear layers incl. dropout copies; QLoRA keeps norms
    # and the embeddings in fp32 after prepare_model_for_kbit_training); doubled for fp32 training.
    per_unit = {"lora": 100, "dora": 120, "qlora": 165, "full": 60}[t.method] * (bytes_per / 2 if t.method != "qlora"
                                                                                else 1)
    if compiled and t.method == "lora":
        # compiled LoRA layers keep ~40 B (bench/results/2026-11-29-nvidia-h200.json, peaks with the
        # logits term below: Llama-3.1-8B shape +16%, Qwen2.5-1.5B +14%, SmolLM2-135M +49%); DoRA and
        # full fine-tuning compiled were measured on the 135M shape only, so they keep the eager figure
        per_unit = 40 * bytes_per / 2
    attn_scores = 0 if device.type == "cuda" else 5 * heads * seq / max(h, 1) * 2  # CPU SDPA may keep them
    act = per_batch * layers * h * (per_unit + attn_scores) + per_batch * vocab * 10  # + logits, fp32 loss
    ckpt = t.gradient_checkpointing
    if ckpt is None:  # stage 03's default (train.device_plan): on for QLoRA on a GPU
        ckpt = device.type == "cuda" and t.method == "qlora"
    if ckpt:
        # Under gradient checkpointing each layer keeps its input and one layer is recomputed at a time:
        # ~7 B per token, layer and hidden unit, plus the logits. Checked on an H200 with QLoRA
        # (bench/results/2026-11-29-h200-qlora-memory.json): TinyLlama-1.1B shape 1.75 GB vs 1.76 measured,
        # Llama-3.1-8B shape at 2,048 tokens 10.4 vs 9.3 GB (the SmolLM2 runs of that file followed
        # other runs in the same process, whose models were still allocated: not clean measurements).
        ckpt_unit = 7 * (bytes_per / 2 if t.method != "qlora" else 1)
        act = per_batch * layers * h * (ckpt_unit + attn_scores) + per_batch * vocab * 10
    # the rate in the dtype training computes in: on a GPU a bf16 product runs ~15x faster than fp32
    if not timed:
        gflops = float("nan")
    elif device.type == "cuda" and bytes_per == 2:
        gflops = matmul_gflops(device, n=4096, dtype=dtype)
    else:
        gflops = matmul_gflops(device)
    # the share of that rate a training step reaches. CPU: SmolLM2-135M LoRA on the demo's data (100
    # steps × 8, packed, logits only at trained positions) took 797 s on all linear layers and 648 s on
    # the attention projections, on a 2-core AVX2 host whose 1,024² product runs at 113-132 GFLOP/s
    # (median): 0.48 and 0.58 of this count's rate (0.25, the figure before, estimated ~2,900 s)
    efficiency = 0.5 if device.type == "cpu" else 0.4
    from ftkit.core.preference import reference_time_factor

    # DPO/KTO also run every sequence through the reference, forward only (time, no activations)
    secs = 4 * total * tokens * reference_time_factor(t.objective) / (efficiency * gflops * 1e9) \
        if gflops and timed else float("nan")
    gb = 1024**3
    # full: gradients at the weights' dtype + two fp32 AdamW moments; adapters: fp32 param, grad, 2 moments
    state_bytes = (bytes_per + 8) if t.method == "full" else 16
    if t.method == "qlora":  # linear layers in NF4 + quantisation constants; embeddings (and head) stay 16-bit
        tied = getattr(config, "tie_word_embeddings", True)
        embed = vocab * h * (1 if tied else 2)
        weights = ((total - embed) * 0.55 + embed * bytes_per) / gb
    else:
        weights = total * bytes_per / gb
    state = trainable * state_bytes / gb
    return Estimate(total, trainable, tokens, weights, state, act / gb, weights + state + act / gb, str(device),
                    gflops, secs, tokens / 1e6 * cfg.convert.hosted_price_per_million_tokens)


def for_run(cfg, result) -> Estimate:
    """The estimate for stage 02's result (train split token counts; for a preference objective, each row's
    step size: a pair's two sequences) and the configured model."""
    from ftkit.core.config import PREFERENCE_OBJECTIVES
    from ftkit.core.modeling import resolve_model_path

    lens = result.lengths["train"]
    if cfg.train.objective in PREFERENCE_OBJECTIVES and result.step_lengths.get("train"):
        lens = result.step_lengths["train"]
    mean = sum(lens) / max(len(lens), 1)
    return estimate(cfg, resolve_model_path(cfg.model.name), sum(lens), len(lens), mean)


class PreflightError(RuntimeError):
    """The configured run clearly does not fit the device."""


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def preflight(cfg, paths, free_bytes: int | None = None, lengths: list[int] | None = None, check=None) -> dict:
    """Estimate before any weight is loaded; stop with concrete suggestions when it will not fit.

    ``lengths``: token counts of the training examples when the caller has them already loaded.
    """
    from ftkit.core.files import read_jsonl
    from ftkit.core.modeling import resolve_device, resolve_model_path

    lens = lengths if lengths is not None else [len(r["input_ids"]) for r in read_jsonl(paths.tokens("train"))]
    path, t = resolve_model_path(cfg.model.name), cfg.train
    data = (sum(lens), len(lens), sum(lens) / max(len(lens), 1))
    est = estimate(cfg, path, *data)
    free = free_bytes if free_bytes is not None else free_memory_bytes(resolve_device(cfg.model))
    if t.max_memory_gb is not None:  # the budget, where it is below what the device has free
        free = min(free, int(t.max_memory_gb * 1024**3))
        if t.gradient_checkpointing is None and est.total_gb * 1024**3 > free:
            # the device plan turns checkpointing on when a budget needs it (ftkit.train.plan): judged so
            est = dataclasses.replace(estimate(checkpointed(cfg), path, *data, timed=False),
                                      device_matmul_gflops=est.device_matmul_gflops,
                                      est_train_seconds=est.est_train_seconds)
    (check or check_fits)(est, cfg, free)
    return {**est.to_dict(), "free_gb": free / 1024**3}


def checkpointed(cfg):
    """``cfg`` with gradient checkpointing on: what a memory budget that needs it runs (pre-flight, device plan)."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, gradient_checkpointing=True))


def check_fits(est: Estimate, cfg, free_bytes: int) -> None:
    """Raise :class:`PreflightError` with concrete suggestions when ``est`` exceeds ``free_bytes``."""
    device, free = est.device, free_bytes
    if est.total_gb * 1024**3 > free:
        t = cfg.train
        tips = []
        if t.method in ("lora", "dora", "full"):
            tips.append("train.method: qlora (4-bit base weights)")
        if t.batch_size > 1:
            small = max(1, t.batch_size // 4)
            tips.append(f"train.batch_size: {small} with train.gradient_accumulation_steps: "
                        f"{t.gradient_accumulation_steps * t.batch_size // small} (same effective batch)")
        if not t.gradient_checkpointing:
            tips.append("train.gradient_checkpointing: true (trades compute for activation memory)")
        if cfg.convert.max_seq_len > 512:
            tips.append(f"a shorter convert.max_seq_len than {cfg.convert.max_seq_len}")
        raise PreflightError(
            f"this run needs about {est.total_gb:.1f} GB (weights {est.weights_gb:.1f} + training state "
            f"{est.trainable_state_gb:.1f} + activations {est.activations_gb:.1f}) but "
            + (f"train.max_memory_gb allows {t.max_memory_gb:g} GB" if t.max_memory_gb is not None
               and free <= t.max_memory_gb * 1024**3 else f"{device} has {free / 1024**3:.1f} GB free")
            + ". Try: " + "; ".join(tips + (["a larger train.max_memory_gb"] if t.max_memory_gb is not None else [])) + "."
        )
