"""The device plan: which of the GPU path's pieces a run uses (precision, attention, kernels, compile,
gradient checkpointing, micro-batch folding), decided once from the config and the device."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from ftkit.core.batches import takes_logit_positions
from ftkit.core.config import ExperimentConfig
from ftkit.core.modeling import (
    resolve_device,
    resolve_model_path,
)
from ftkit.train import kernels

log = logging.getLogger(__name__)


# What stage 03 uses on a CUDA device, each piece kept because it measured faster on an H200 against
# the plain transformers + PEFT path (bench/train_throughput.py; figures in bench/README.md). On CPU
# every choice stays what it was. Each can be switched off in the config.
COMPILE_MIN_SECONDS = 300
"""``train.compile: null`` compiles only when the pre-flight estimate of the training time is at
least this long: compiling the layers takes ~30-75 s on an H200, which a short run does not win back."""


@dataclass(frozen=True)
class Applied:
    """What :func:`prepare_for_device` actually applied to a loaded model: a piece the model cannot take
    falls back to the plain path, and the report says which."""

    kernels: str = "none"
    attention: str | None = None
    trained_logits_only: bool = False
    compiled_layers: int | None = None  # None: compiling was not asked for
    compile_wrapper: str | None = None
    compiled_loss: bool = False
    fused_lora_a: int = 0  # groups of LoRA A projections computed as one product (lora_fusion)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if self.compiled_layers is None:
            for k in ("compiled_layers", "compile_wrapper", "compiled_loss"):
                out.pop(k)
        return out


@dataclass(frozen=True)
class DevicePlan:
    """The settings stage 03 uses on this device, every ``auto`` resolved (:func:`device_plan`); frozen:
    folding the accumulation or loading the model gives a new plan (:func:`dataclasses.replace`)."""

    device: str
    optimizer: str
    gradient_checkpointing: bool
    attention: str
    kernels: str
    compile: bool
    merge_accumulation: bool
    trained_logits_only: bool
    micro_batch: int
    accumulation: int
    fused_lora_a: bool = False  # LoRA A products sharing an input fused (ftkit.train.lora_fusion)
    folded_estimate_gb: float | None = None  # set when fold_accumulation sized the micro-batch
    applied: Applied | None = None  # set once the model is loaded

    def to_dict(self) -> dict:
        """The flat form the metrics and the log show (``applied_*`` for what was applied)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("applied",)}
        if self.folded_estimate_gb is None:
            out.pop("folded_estimate_gb")
        if self.applied is not None:
            out.update({f"applied_{k}": v for k, v in self.applied.to_dict().items()})
        return out


def device_plan(cfg: ExperimentConfig, est_train_seconds: float | None = None) -> DevicePlan:
    """The settings stage 03 uses on this device, with every ``auto`` resolved.

    ``est_train_seconds``: the pre-flight estimate; with ``train.compile: null`` a run estimated
    shorter than :data:`COMPILE_MIN_SECONDS` is not compiled.

    On CUDA: fused AdamW; padding-free packing with the varlen flash attention; decoder layers
    compiled (LoRA, DoRA, full fine-tuning, QLoRA; one process; runs long enough), else Liger's fused
    kernels when installed; no gradient
    checkpointing except for QLoRA (whose point is memory); accumulation steps folded into larger
    micro-batches (:func:`fold_accumulation` sizes them); the LM head and loss only at trained
    positions (:class:`TrainedPositions`).
    On CPU: AdamW, no fused kernels, no compile, no checkpointing; with packing each example's own
    attention (SDPA per example) and the LM head only at trained positions, as on a GPU.
    """
    t = cfg.train
    cuda = resolve_device(cfg.model).type == "cuda"
    optimizer = t.optimizer if t.optimizer != "auto" else ("adamw_torch_fused" if cuda else "adamw_torch")
    ckpt = t.gradient_checkpointing if t.gradient_checkpointing is not None else (cuda and t.method == "qlora")
    attention = t.attention
    if attention == "auto":
        # on CPU too: there each packed example goes through SDPA on its own, the causal triangles of
        # the examples instead of the packed row's block mask (demo on 2 cores: 12.1 -> 10.0 s a step)
        attention = "varlen" if t.packing and kernels.varlen_fn() is not None else "sdpa"
    # compiled layers: measured on an H200 (bench/train_throughput.py: same losses as eager for LoRA,
    # DoRA, full fine-tuning and QLoRA; QLoRA compiled: 8B Bitext 1.3x eager at 0.7x its peak)
    # (several processes: not measured compiled with DDP/FSDP/DeepSpeed, so `auto` leaves them eager)
    short = est_train_seconds is not None and est_train_seconds < COMPILE_MIN_SECONDS
    wanted = t.compile if t.compile is not None else (cuda and not short and t.num_processes <= 1)
    compile_ = bool(wanted)
    kern = t.kernels
    if kern == "auto":
        kern = "liger" if cuda and kernels.liger_available() and not compile_ else "none"
    merge = t.merge_accumulation if t.merge_accumulation is not None else (cuda and t.packing)
    # (Liger's fused linear cross-entropy replaces the model's forward: left as it computes)
    # (CPU measured too: the head and log-softmax over prompt positions were ~15% of a demo step)
    trained_only = (t.trained_logits_only if t.trained_logits_only is not None else True) and t.packing
    trained_only = trained_only and kern != "liger+loss"
    return DevicePlan(device="cuda" if cuda else str(resolve_device(cfg.model)), optimizer=optimizer,
                      gradient_checkpointing=bool(ckpt), attention=attention, kernels=kern, compile=compile_,
                      merge_accumulation=bool(merge and t.gradient_accumulation_steps > 1),
                      trained_logits_only=bool(trained_only), micro_batch=t.batch_size,
                      accumulation=t.gradient_accumulation_steps,
                      # measured on an H200 (1.5B shape +7%, 8B +2%: bench/README.md) and on 2 CPU cores
                      # (SmolLM2-135M step ~6%); plain LoRA without dropout only (each layer's dropout draws
                      # its own mask); one process only: DeepSpeed ZeRO-3 gathers a layer's weights when
                      # that layer's module runs, and a fused group reads its neighbours' A matrices
                      fused_lora_a=t.method == "lora" and t.lora.dropout == 0 and t.num_processes <= 1)


def fold_accumulation(cfg: ExperimentConfig, plan: DevicePlan, lengths: list[int], free_bytes: int,
                      headroom: float = 0.9) -> DevicePlan:
    """With ``merge_accumulation``, the fewest accumulation steps (a divisor of the configured ones)
    whose larger micro-batch the memory estimate fits in ``headroom`` of the free memory.

    A packed micro-batch holds as many tokens as its examples, so it is sized by the largest token
    count of 256 random micro-batches of that many examples (drawn with a fixed seed), not by the
    mean: with long documents the largest batches are twice the mean or more, and a run meets its
    largest batches sooner or later. Compiled layers are estimated at their own (smaller) activation
    figure (:func:`ftkit.core.estimate.estimate`'s ``compiled``).

    Under ``train.max_memory_gb`` (``free_bytes`` is then at most the budget), gradient checkpointing
    left to ``auto`` is turned on first when the configured micro-batch would not fit without it.
    """
    from ftkit.core.estimate import estimate

    if not lengths:
        return plan
    cfg, plan = _checkpointing_for_budget(cfg, plan, lengths, free_bytes, headroom)
    if not plan.merge_accumulation:
        return plan
    t, path = cfg.train, resolve_model_path(cfg.model.name)
    accum = t.gradient_accumulation_steps
    for k in [d for d in range(accum, 0, -1) if accum % d == 0]:
        size = min(t.batch_size * k, len(lengths))
        largest = _largest(lengths, size)
        trial = dataclasses.replace(cfg, train=dataclasses.replace(t, batch_size=t.batch_size * k,
                                                                   gradient_accumulation_steps=accum // k))
        est = estimate(trial, path, sum(lengths), len(lengths), largest / size, compiled=plan.compile, timed=False)
        if est.total_gb * 1024**3 <= headroom * free_bytes or k == 1:
            # the estimate for the micro-batch actually used (the pre-flight one is for the configured size)
            return dataclasses.replace(plan, micro_batch=t.batch_size * k, accumulation=accum // k,
                                       folded_estimate_gb=round(est.total_gb, 2))
    return plan


def _checkpointing_for_budget(cfg: ExperimentConfig, plan: DevicePlan, lengths: list[int], free_bytes: int,
                              headroom: float) -> tuple[ExperimentConfig, DevicePlan]:
    """Under ``train.max_memory_gb``, with checkpointing left to ``auto`` and off: on, when the configured
    micro-batch does not fit the budget without it (the method and the micro-batch stay; only
    activations are recomputed). Returns the config and plan to fold with."""
    from ftkit.core.estimate import checkpointed, estimate

    t = cfg.train
    if t.gradient_checkpointing is not None or plan.gradient_checkpointing or t.max_memory_gb is None:
        return cfg, plan
    size = min(t.batch_size, len(lengths))
    est = estimate(cfg, resolve_model_path(cfg.model.name), sum(lengths), len(lengths),
                   _largest(lengths, size) / size, compiled=plan.compile, timed=False)
    if est.total_gb * 1024**3 <= headroom * free_bytes:
        return cfg, plan
    return checkpointed(cfg), dataclasses.replace(plan, gradient_checkpointing=True)


def _largest(lengths: list[int], size: int) -> int:
    """The largest token count of 256 random micro-batches of ``size`` examples (fixed seed)."""
    import random

    rng = random.Random(0)
    return max(sum(rng.sample(lengths, size)) for _ in range(256))


def fold_for_model(cfg: ExperimentConfig, planned: DevicePlan, applied: Applied, lengths: list[int],
                   free_bytes: int) -> DevicePlan:
    """:func:`fold_accumulation` for the loaded model: sized for compiled layers (which keep fewer
    activations) only where :func:`prepare_for_device` compiled them, so a model whose layers could
    not be compiled gets micro-batches that fit eager layers. ``free_bytes``: measured before loading
    (the estimate includes the weights). The plan returned records ``applied``."""
    folded = fold_accumulation(cfg, dataclasses.replace(planned, compile=bool(applied.compiled_layers)), lengths,
                               free_bytes)
    return dataclasses.replace(folded, applied=applied)


def prepare_for_device(model, plan: DevicePlan, recipe=None) -> Applied:
    """Apply a :func:`device_plan` to a loaded model (before adapters are added); returns what was
    applied (a piece that is unavailable for this model falls back to the plain path). ``recipe``: a
    :class:`ftkit.train.recipe.Recipe` (default: stage 03's)."""
    from ftkit.train.recipe import DEFAULT

    recipe = recipe or DEFAULT
    kern, layers, wrapper, loss = "none", None, None, False
    if plan.kernels in ("liger", "liger+loss") and kernels.apply_fused_kernels(model, plan.kernels == "liger+loss"):
        kern = plan.kernels
    if plan.compile:
        # on a GPU each compiled layer launches its kernels from generated C++ (Inductor's C++ wrapper)
        # rather than Python: the host launches ~3,000 kernels a step, and a step of short examples
        # waits on it (1.5B Bitext: +2.7% mean over four runs on two hosts; bench/README.md)
        cpp = plan.device == "cuda"
        layers = recipe.compile_layers(model, **({"options": {"cpp_wrapper": True}} if cpp else {}))
        wrapper = "cpp" if cpp and layers else None
        loss = kernels.compile_loss(model)
        if not layers:
            log.warning("decoder layers not compiled (no *DecoderLayer list found): they run eager")
    attention = getattr(model.config, "_attn_implementation", None)
    if plan.attention == "varlen" and recipe.register_attention():
        model.config._attn_implementation = kernels.VARLEN
        attention = kernels.VARLEN
    return Applied(kernels=kern, attention=attention,
                   trained_logits_only=plan.trained_logits_only and takes_logit_positions(model),
                   compiled_layers=layers, compile_wrapper=wrapper, compiled_loss=loss)
