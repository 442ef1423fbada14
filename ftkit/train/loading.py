"""The model to train: full weights, LoRA/DoRA on them, or a 4-bit (QLoRA) base; and the memory
figures reported around it."""

from __future__ import annotations

import dataclasses

import torch

from ftkit.core.config import ExperimentConfig
from ftkit.core.modeling import (
    load_model,
    resolve_device,
)
from ftkit.train.plan import DevicePlan, device_plan, prepare_for_device


def add_lora(model, cfg: ExperimentConfig):
    """A new adapter from ``train.lora``, or the one ``train.init_adapter`` names, trainable."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if cfg.train.init_adapter:
        from pathlib import Path

        from ftkit.core.config import init_adapter_path

        where = init_adapter_path(cfg)
        if not (Path(where) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"train.init_adapter: {where} holds no adapter (adapter_config.json); run that "
                                    "experiment's stage 03 first (make 03 EXP=<name>), or fix the path")
        return PeftModel.from_pretrained(model, where, is_trainable=True)
    lc = cfg.train.lora
    peft_cfg = LoraConfig(
        r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules,
        task_type="CAUSAL_LM", bias="none", use_dora=cfg.train.method == "dora", use_rslora=lc.rslora,
        modules_to_save=lc.modules_to_save or None,
    )
    return get_peft_model(model, peft_cfg)


def load_4bit(base_path: str, cfg: ExperimentConfig):
    """The base model quantised to 4-bit NF4 with double quantisation, computing in bf16 on GPUs, else fp32.

    On CPUs with AVX512-BF16, bitsandbytes switches a 4-bit layer to a packed bf16 kernel the first
    time it runs in eval mode, in place and for good; its logits then differ from the exact
    dequantised product (by ~1.8 on SmolLM2-135M), so a model evaluated mid-training and a freshly
    reloaded one disagree. ftkit turns that path off: 4-bit layers always compute what was trained.
    """
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = resolve_device(cfg.model)
    compute = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute)
    from ftkit.core.modeling import weights_kwargs

    model = AutoModelForCausalLM.from_pretrained(base_path, quantization_config=quant, dtype=compute,
                                                 device_map={"": str(device)},
                                                 trust_remote_code=cfg.model.trust_remote_code,
                                                 **weights_kwargs(base_path, cfg.model.allow_pickle_weights))
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def load_for_training(cfg: ExperimentConfig, base_path: str, plan: DevicePlan | None = None, recipe=None):
    """``(model, applied)``: the model to train (4-bit NF4 for QLoRA, otherwise in the configured dtype;
    adapters added) and what of ``plan`` (default: worked out from ``cfg``) it took. ``recipe``: a
    :class:`ftkit.train.recipe.Recipe` (default: stage 03's)."""
    from ftkit.train.recipe import DEFAULT

    recipe = recipe or DEFAULT
    method = cfg.train.method
    plan = plan or device_plan(cfg)
    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = load_4bit(base_path, cfg)
        if plan.device == "cuda":
            # frozen norms, embeddings and head stay bf16: prepare_model_for_kbit_training's fp32 copies
            # double their memory (2 GB more on an 8B model) and make the head's matmul an fp32 one
            for p in model.parameters():
                p.requires_grad_(False)
        else:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = load_model(base_path, cfg.model, full_precision=method == "full")
    model.config.use_cache = False
    applied = prepare_for_device(model, plan, recipe)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model.train(), applied
    model = recipe.add_adapters(model, cfg)
    if plan.fused_lora_a:
        applied = dataclasses.replace(applied, fused_lora_a=recipe.fuse_lora_a(model))
    return model, applied


def free_leftovers(device: torch.device) -> float | None:
    """Before loading: collect what earlier runs in this process left in reference cycles (a notebook
    that trains twice, a script that trains several models: the finished model, its optimizer and
    compiled graphs stay on the GPU until a garbage collection) and reset the peak counter. Returns
    the GPU memory still held after that (MB), which the stage's peak then includes."""
    import gc

    gc.collect()
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / 2**20


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or this process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
