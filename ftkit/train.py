"""Stage 03: LoRA fine-tuning on the transformers Trainer, loss on assistant tokens only.

The labels built in stage 02 already mask everything but the assistant replies and their
end-of-turn token; the collator only pads (labels with -100, never by token id, so EOS stays
trained even where pad == EOS). The Trainer normalises the loss by the number of trained tokens
across the whole accumulated batch (``num_items_in_batch``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from .config import ExperimentConfig
from .masking import IGNORE_INDEX
from .modeling import count_parameters, load_model, load_tokenizer, resolve_device, resolve_model_path
from .paths import RunPaths, read_jsonl, write_json

log = logging.getLogger("ftkit")

TRAIN_INFO = "ftkit_train.json"  # written next to the adapter: which base it belongs to


class TokenizedDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


@dataclass
class PadCollator:
    """Right-pad a batch to its longest example; labels are padded with -100."""

    pad_token_id: int

    def __call__(self, batch: list[dict]) -> dict:
        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            labels[i, :k] = torch.tensor(b["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class PackingError(RuntimeError):
    """The model's attention would mix packed examples."""


@torch.no_grad()
def packing_leak(model) -> float:
    """How much an example's logits depend on the example packed before it in the same row.

    Padding-free packing is only correct when the attention implementation honours per-example
    position ids (a block-diagonal mask). The same example is run after two different prefixes of
    equal length: with the mask honoured its logits do not change at all (same shapes, same
    kernels, whatever the dtype or quantisation); with a leak they move by the size of logits.
    """
    device = next(model.parameters()).device
    first = torch.tensor([[5, 17, 42, 99, 7, 23]], device=device)
    other = torch.tensor([[61, 8, 300, 12, 77, 1000]], device=device)
    b = torch.tensor([[11, 13, 19, 3]], device=device)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3]], device=device)
    out = [model(input_ids=torch.cat([prefix, b], 1), position_ids=pos, use_cache=False).logits[0, first.shape[1]:]
           for prefix in (first, other)]
    return (out[0].float() - out[1].float()).abs().max().item()


def check_packing(model, tolerance: float = 1e-3) -> float:
    was_training = model.training
    model.eval()
    try:
        leak = packing_leak(model)
    finally:
        model.train(was_training)
    if leak > tolerance:
        raise PackingError(
            f"packing would leak attention across examples with this model "
            f"(attn_implementation={getattr(model.config, '_attn_implementation', '?')}): logits move by {leak:.3g}. "
            "Set train.packing: false, or use an attention implementation that honours position_ids (sdpa, "
            "flash_attention_2, flex_attention on transformers >= 5)."
        )
    return leak


def make_collator(pad_token_id: int, packing: bool):
    """Padding-free packing (transformers' DataCollatorWithFlattening) or right padding."""
    if packing:
        from transformers import DataCollatorWithFlattening

        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    return PadCollator(pad_token_id)


def load_tokens(path: Path, limit: int | None = None, objective: str = "instruction") -> list[dict]:
    """Tokenised examples; with the ``completion`` objective every token after the first is trained."""
    rows = read_jsonl(path)[:limit] if limit else read_jsonl(path)
    if objective == "completion":
        return [{"input_ids": r["input_ids"], "labels": [IGNORE_INDEX] + r["input_ids"][1:]} for r in rows]
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]


def set_seed(seed: int, deterministic: bool = False) -> None:
    from transformers import enable_full_determinism
    from transformers import set_seed as hf_set_seed

    if deterministic:
        enable_full_determinism(seed)
    else:
        hf_set_seed(seed)


def _sampling_args(group_by_length: bool) -> dict:
    """transformers 5 renamed group_by_length to train_sampling_strategy; support both."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    if "train_sampling_strategy" in names:
        return {"train_sampling_strategy": "group_by_length" if group_by_length else "random"}
    return {"group_by_length": group_by_length}


COMPLETE_MARKER = "ftkit_checkpoint_complete.json"


class CompleteCheckpointMarker(TrainerCallback):
    """Writes a marker into each checkpoint after the Trainer finished writing it (atomically),
    so a checkpoint torn by a crash or SIGKILL mid-write is recognised and never resumed from."""

    def on_save(self, args, state, control, **kwargs):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.is_dir() and state.is_world_process_zero:
            write_json(ckpt / COMPLETE_MARKER, {"global_step": state.global_step, "files": sorted(
                p.name for p in ckpt.iterdir())})
        return control


def find_resume_checkpoint(checkpoints_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: the newest complete one (``auto``), none, or a given path."""
    if resume == "never":
        return None
    if resume != "auto":
        p = Path(resume)
        if not (p / COMPLETE_MARKER).exists():
            raise FileNotFoundError(f"train.resume: {p} is not a complete ftkit checkpoint (no {COMPLETE_MARKER})")
        return p
    if not checkpoints_dir.is_dir():
        return None
    found = sorted((d for d in checkpoints_dir.glob("checkpoint-*") if d.name.split("-")[-1].isdigit()),
                   key=lambda d: int(d.name.split("-")[-1]), reverse=True)
    for d in found:
        if (d / COMPLETE_MARKER).exists():
            return d
        log.warning("skipping torn checkpoint %s (no %s: it was not finished being written)", d, COMPLETE_MARKER)
    return None


def build_trainer(cfg: ExperimentConfig, paths: RunPaths, model, tokenizer, train_rows, val_rows):
    """A configured transformers Trainer; kept separate so tests can inspect it."""
    from transformers import Trainer, TrainingArguments

    t = cfg.train
    device = resolve_device(cfg.model)
    args = TrainingArguments(
        output_dir=str(paths.checkpoints_dir),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if t.eval_steps > 0 and val_rows else "no",
        eval_steps=t.eval_steps or None,
        save_strategy="steps" if t.save_steps > 0 else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        load_best_model_at_end=bool(t.early_stopping_patience) and t.save_steps > 0,
        metric_for_best_model="eval_loss" if t.early_stopping_patience else None,
        report_to=t.report_to or "none",
        include_num_input_tokens_seen=True,
        seed=cfg.seed,
        data_seed=cfg.seed,
        full_determinism=t.deterministic,
        optim=t.optimizer,
        **_sampling_args(t.group_by_length),
        neftune_noise_alpha=t.neftune_noise_alpha,
        use_cpu=device.type == "cpu",
        bf16=next(model.parameters()).dtype == torch.bfloat16,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    from transformers import EarlyStoppingCallback

    callbacks = [CompleteCheckpointMarker()]
    if t.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience))
    return Trainer(
        model=model,
        callbacks=callbacks,
        args=args,
        train_dataset=TokenizedDataset(train_rows),
        eval_dataset=TokenizedDataset(val_rows) if val_rows else None,
        data_collator=make_collator(tokenizer.pad_token_id, cfg.train.packing),
    )


def add_lora(model, cfg: ExperimentConfig):
    from peft import LoraConfig, get_peft_model

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
    model = AutoModelForCausalLM.from_pretrained(base_path, quantization_config=quant, dtype=compute,
                                                 device_map={"": str(device)},
                                                 trust_remote_code=cfg.model.trust_remote_code)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def load_for_training(cfg: ExperimentConfig, base_path: str):
    """The model to train: 4-bit NF4 for QLoRA, otherwise in the configured dtype; adapters added."""
    method = cfg.train.method
    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = load_4bit(base_path, cfg)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = load_model(base_path, cfg.model)
    model.config.use_cache = False
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model.train()
    return add_lora(model, cfg)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or this process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def overfitting(history: list[dict], patience: int = 2) -> dict:
    """Flag when validation loss rose over the last ``patience`` evaluations while training loss fell."""
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    trains = [(h["step"], h["loss"]) for h in history if "loss" in h]
    if len(evals) <= patience or len(trains) < 2:
        return {"flag": False, "reason": f"fewer than {patience + 1} evaluations"}
    recent = [v for _, v in evals[-(patience + 1):]]
    rising = all(b > a for a, b in zip(recent, recent[1:], strict=False))
    since = evals[-(patience + 1)][0]
    train_then = [v for st, v in trains if st <= since][-1:] or [trains[0][1]]
    falling = trains[-1][1] < train_then[0]
    flag = rising and falling
    best = min(evals, key=lambda e: e[1])
    reason = (f"val loss rose {recent[0]:.4f} -> {recent[-1]:.4f} over the last {patience} evaluations while "
              f"train loss fell; best val loss {best[1]:.4f} at step {best[0]}") if flag else \
        f"no sustained rise of val loss (best {best[1]:.4f} at step {best[0]})"
    return {"flag": flag, "reason": reason, "best_step": best[0], "best_eval_loss": best[1]}


def write_log_csv(history: list[dict], path: Path) -> None:
    import csv

    keys = sorted({k for h in history for k in h})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)


def train(cfg: ExperimentConfig, paths: RunPaths) -> dict:
    """Run stage 03: LoRA training, adapter saved to ``paths.adapter_dir``; returns metrics."""
    return run_training(cfg, paths)[1]


def run_training(cfg: ExperimentConfig, paths: RunPaths):
    """Stage 03, returning ``(trainer, metrics)`` so callers can inspect the trained model."""
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    set_seed(cfg.seed, cfg.train.deterministic)
    base_path = resolve_model_path(cfg.model.name)
    tokenizer = load_tokenizer(paths.require(paths.tokenizer_dir, "02_format_conversion"), cfg.model)
    objective = cfg.train.objective
    train_rows = load_tokens(paths.require(paths.tokens("train"), "02_format_conversion"), objective=objective)
    val_rows = load_tokens(paths.require(paths.tokens("val"), "02_format_conversion"), cfg.train.max_eval_examples,
                           objective=objective)
    from .estimate import preflight

    # before any weight is loaded: stops early if it clearly won't fit
    plan = preflight(cfg, paths, lengths=[len(r["input_ids"]) for r in train_rows])
    log.info("pre-flight: ~%.2f GB needed of %.1f GB free, ~%.0f s estimated", plan["total_gb"], plan["free_gb"],
             plan["est_train_seconds"])
    model = load_for_training(cfg, base_path)
    packing_leak_max = check_packing(model) if cfg.train.packing else None
    trainable, total = count_parameters(model)
    log.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    trainer = build_trainer(cfg, paths, model, tokenizer, train_rows, val_rows)
    start = time.perf_counter()
    resume_from = find_resume_checkpoint(paths.checkpoints_dir, cfg.train.resume)
    if resume_from:
        log.info("resuming from %s", resume_from)
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - start
    final_eval = trainer.evaluate() if val_rows else {}

    if trainer.is_world_process_zero() and paths.adapter_dir.exists():
        import shutil

        shutil.rmtree(paths.adapter_dir)  # no stale files from an earlier run with another method
    trainer.save_model(str(paths.adapter_dir))  # the adapter, or the whole model for `full`; main process only
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(paths.adapter_dir)
        write_json(paths.adapter_dir / TRAIN_INFO, {"base_model": cfg.model.name, "base_path": base_path,
                                                    "method": cfg.train.method, "objective": cfg.train.objective})
        write_json(paths.train_log, trainer.state.log_history)
    if trainer.args.world_size > 1:  # every rank records what it ended with, so agreement can be checked
        trained = [p.detach().float() for p in trainer.model.parameters() if p.requires_grad]
        write_json(paths.root / "logs" / f"rank{trainer.args.process_index}.json", {
            "rank": trainer.args.process_index, "world_size": trainer.args.world_size,
            "trainable_sum": float(sum(p.sum() for p in trained)), "trainable_abs_sum": float(sum(p.abs().sum() for p in trained)),
            "global_step": trainer.state.global_step})
    history = trainer.state.log_history

    steps = trainer.state.global_step
    batch = cfg.train.batch_size * cfg.train.gradient_accumulation_steps
    seen = min(steps * batch, len(train_rows) * math.ceil(max(cfg.train.epochs, 1)))
    tokens = int(getattr(trainer.state, "num_input_tokens_seen", 0) or
                 sum(len(r["input_ids"]) for r in train_rows) * seen / max(len(train_rows), 1))
    losses = [h["loss"] for h in history if "loss" in h]
    if trainer.is_world_process_zero():
        write_log_csv(history, paths.train_log.with_suffix(".csv"))
    return trainer, {
        "train_loss": result.training_loss,
        "eval_loss": final_eval.get("eval_loss"),
        "train_tokens": tokens,
        "peak_memory_mb": peak_memory_mb(resolve_device(cfg.model)),
        "trainable_params": trainable,
        "total_params": total,
        "runtime_s": seconds,
        "overfitting": overfitting(history),
        "checkpoints": sorted(str(p) for p in paths.checkpoints_dir.glob("checkpoint-*")),
        "method": cfg.train.method,
        "base_model": cfg.model.name,
        "train_examples": len(train_rows),
        "steps": steps,
        "epochs_done": trainer.state.epoch,
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "train_loss_mean": result.training_loss,
        "val_loss": final_eval.get("eval_loss"),
        "tokens_per_second": tokens / seconds if seconds else None,
        "device": str(resolve_device(cfg.model)),
        "resumed_from": str(resume_from) if resume_from else None,
        "steps_this_run": steps - (int(resume_from.name.split("-")[-1]) if resume_from else 0),
        "preflight": plan,
        "packing": cfg.train.packing,
        "packing_leak_max_logit_diff": packing_leak_max,
    }


def load_adapter_model(cfg: ExperimentConfig, paths: RunPaths):
    """The trained model and its tokenizer: base + adapter (LoRA/QLoRA/DoRA; the adapter can be
    disabled for base scores) or the fully fine-tuned weights."""
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
        return load_model(str(adapter), cfg.model), tokenizer
    model = load_model(resolve_model_path(cfg.model.name), cfg.model)  # full precision, also for QLoRA
    model = PeftModel.from_pretrained(model, adapter)
    return model.eval(), tokenizer


def trained_info(paths: RunPaths) -> dict:
    return json.loads((paths.require(paths.adapter_dir, "03_train") / TRAIN_INFO).read_text())
