"""A trained run's model as later stages load it: the adapter (or full weights) on the base it was
trained from, recorded next to it."""

from __future__ import annotations

import json

from ftkit.core.config import ExperimentConfig
from ftkit.core.modeling import (
    load_model,
    load_tokenizer,
    resolve_model_path,
)
from ftkit.core.paths import RunPaths

TRAIN_INFO = "ftkit_train.json"  # written next to the adapter: which base it belongs to


def load_adapter_model(cfg: ExperimentConfig, paths: RunPaths, full_precision: bool = False):
    """The trained model and its tokenizer: base + adapter (LoRA/QLoRA/DoRA; the adapter can be
    disabled for base scores) or the fully fine-tuned weights. ``full_precision``: float32 on a CPU
    even where ``model.dtype: auto`` would compute in bf16 (a merge: :func:`ftkit.core.modeling.resolve_dtype`)."""
    from peft import PeftModel

    adapter = paths.require(paths.adapter_dir, "03_train")
    info = trained_info(paths)
    if info["base_model"] != cfg.model.name:
        raise ValueError(
            f"{adapter} was trained on {info['base_model']!r} but model.name is {cfg.model.name!r}; "
            "use the same model.name as stage 03 or retrain"
        )
    tokenizer = load_tokenizer(str(adapter), cfg.model)
    if info.get("method") == "full":
        return load_model(str(adapter), cfg.model, full_precision=full_precision), tokenizer
    # not 4-bit, also for QLoRA: the adapter goes onto the base in its own precision
    model = load_model(resolve_model_path(cfg.model.name), cfg.model, full_precision=full_precision)
    model = PeftModel.from_pretrained(model, adapter)
    return model.eval(), tokenizer


def trained_info(paths: RunPaths) -> dict:
    return json.loads((paths.require(paths.adapter_dir, "03_train") / TRAIN_INFO).read_text())
