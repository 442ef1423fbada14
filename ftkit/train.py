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
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from .config import ExperimentConfig
from .masking import IGNORE_INDEX
from .modeling import count_parameters, forward_params, load_model, load_tokenizer, resolve_device, resolve_model_path
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
    vocab = model.get_input_embeddings().num_embeddings  # small test vocabularies too

    def ids(*xs):
        return torch.tensor([[x % vocab for x in xs]], device=device)

    first, other, b = ids(5, 17, 42, 99, 7, 23), ids(61, 8, 300, 12, 77, 1000), ids(11, 13, 19, 3)
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


def make_collator(pad_token_id: int, packing: bool, boundaries: bool = False, trained_logits_only: bool = False):
    """Padding-free packing (transformers' DataCollatorWithFlattening) or right padding.

    ``boundaries``: also hand the model each packed example's start (``cu_seq_lens_q/k``) and the
    longest example's length, computed here on the host, so the varlen attention needs no device sync.
    ``trained_logits_only``: see :class:`TrainedPositions` (packing only).
    """
    if packing:
        from transformers import DataCollatorWithFlattening

        flat = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX,
                                          return_flash_attn_kwargs=boundaries)
        return TrainedPositions(flat) if trained_logits_only else flat
    return PadCollator(pad_token_id)


@dataclass
class TrainedPositions:
    """Wraps a packing collator so the model computes logits only where they are trained.

    Adds ``logits_to_keep``: the positions of the packed row whose next token is trained, and
    ``shift_labels``: those next tokens. A transformers causal LM then applies its LM head to those
    positions alone and its loss takes ``shift_labels`` as the targets: the same loss, summed over
    the same tokens (the Trainer counts them from ``shift_labels`` or ``labels``, which agree), without
    the head's product and the softmax over the prompts' positions. A micro-batch with no trained
    token keeps one position with no target (its loss adds 0)."""

    collator: object

    def __call__(self, features: list[dict]) -> dict:
        batch = self.collator(features)
        labels = batch["labels"]
        if labels.shape[0] != 1:
            return batch
        targets = labels[0, 1:]
        keep = (targets != IGNORE_INDEX).nonzero().reshape(-1)
        if keep.numel() == 0:
            keep = torch.zeros(1, dtype=torch.long)
        batch["logits_to_keep"] = keep
        batch["shift_labels"] = targets[keep].unsqueeze(0)
        return batch


def takes_logit_positions(model) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (which transformers' causal LMs accept
    as a tensor of positions)."""
    return "logits_to_keep" in forward_params(model)


# ---- the GPU path ---------------------------------------------------------------------------------
# What stage 03 uses on a CUDA device, each piece kept because it measured faster on an H200 against
# the plain transformers + PEFT path (bench/train_throughput.py; figures in bench/results/ and the
# README). On CPU every choice stays what it was. Each can be switched off in the config.

VARLEN = "ftkit_varlen"


def _varlen_fn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_attention(fn):
    """ftkit's attention over packed examples, with PyTorch's variable-length flash kernel ``fn``
    (its options resolved here once, not on every call).

    Each example attends only to itself, and the kernel computes only the examples' own causal
    triangles (sum of L^2/2), not the packed row's (sum of L)^2/2 as SDPA with a block mask does.
    Boundaries come from the collator (``cu_seq_lens_q``, ``max_length_q``: no device sync), else
    from ``position_ids`` (restarting at 0 per example). Without the kernel (CPU, fp32) each example
    goes through SDPA on its own. transformers builds no mask for this implementation: a batch of
    several right-padded rows gets plain causal SDPA, exact for every real token.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = {"is_causal": True} if _accepts(fn, "is_causal") else {"window_size": (-1, 0)}
    gqa = _accepts(fn, "enable_gqa")

    def forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                is_causal: bool | None = None, **kwargs):
        if query.shape[0] != 1 or attention_mask is not None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                          is_causal=attention_mask is None, **kwargs)
        n = query.shape[2]
        cu, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
        if cu is None:
            position_ids = kwargs.get("position_ids")
            starts = torch.zeros(1, dtype=torch.int32, device=query.device)
            if position_ids is not None:
                found = (position_ids.reshape(-1) == 0).nonzero().reshape(-1).to(torch.int32)
                starts = torch.unique(torch.cat([starts, found]))
            cu = torch.cat([starts, torch.tensor([n], dtype=torch.int32, device=query.device)])
            longest = int(cu.diff().max())
        if isinstance(longest, torch.Tensor):  # an int from transformers' collator; kept symbolic when traced
            longest = int(longest)
        cu = cu.to(device=query.device, dtype=torch.int32)
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, head_dim)
        if query.device.type != "cuda" or query.dtype not in (torch.bfloat16, torch.float16) or dropout:
            outs = []
            for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
                qs, ks, vs = (t[a:b].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
                outs.append(sdpa_attention_forward(module, qs, ks, vs, None, dropout=dropout, scaling=scaling,
                                                   is_causal=True)[0][0])
            return torch.cat(outs).unsqueeze(0), None
        kw = {"scale": scaling, **causal}
        if q.shape[1] != k.shape[1]:  # grouped-query attention
            if gqa:
                kw["enable_gqa"] = True
            else:
                k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        return fn(q, k, v, cu, cu, longest, longest, **kw).unsqueeze(0), None

    return forward


def _accepts(fn, name: str) -> bool:
    import inspect

    return name in inspect.signature(fn).parameters


def register_varlen_attention(traced: bool = False) -> bool:
    """Register :func:`varlen_attention` with transformers as ``ftkit_varlen``; False when this
    PyTorch has no ``torch.nn.attention.varlen`` (then SDPA with a block mask is used). Compiled
    layers call it eagerly unless ``traced`` (an experiment: the kernel is a torch custom op, so a
    layer can be one graph; ``bench/train_throughput.py`` measures it)."""
    fn = _varlen_fn()
    if fn is None:
        return False
    from transformers import AttentionInterface

    forward = varlen_attention(fn)
    AttentionInterface.register(VARLEN, forward if traced else torch.compiler.disable(forward))
    return True


def liger_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def apply_fused_kernels(model, fused_loss: bool = False) -> bool:
    """Liger's fused RMSNorm and SwiGLU (and, with ``fused_loss``, its linear + cross-entropy that never
    builds the logits) on this model instance; rotary embeddings stay (Liger patches those
    module-wide). False when unsupported."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return False
    if getattr(model.config, "model_type", None) not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return False
    # Liger also swaps the classes in the model's modeling module (e.g. modeling_llama.LlamaRMSNorm),
    # so every model built later in the process would get its modules too: put the module back.
    module = sys.modules[type(model).__module__]
    before = dict(vars(module))
    try:
        _apply_liger_kernel_to_instance(model=model, rope=False, fused_linear_cross_entropy=fused_loss)
    finally:
        for name in [n for n in vars(module) if n not in before]:
            delattr(module, name)
        for name, value in before.items():
            if getattr(module, name, None) is not value:
                setattr(module, name, value)
    return True


COMPILE_MIN_SECONDS = 300
"""``train.compile: null`` compiles only when the pre-flight estimate of the training time is at
least this long: compiling the layers takes ~30-75 s on an H200 (the C++ wrapper ~30 s more than
Python's on the 1.5B shape), which a short run does not win back."""


def device_plan(cfg: ExperimentConfig, est_train_seconds: float | None = None) -> dict:
    """The settings stage 03 uses on this device, with every ``auto`` resolved.

    ``est_train_seconds``: the pre-flight estimate; with ``train.compile: null`` a run estimated
    shorter than :data:`COMPILE_MIN_SECONDS` is not compiled.

    On CUDA: fused AdamW; padding-free packing with the varlen flash attention; decoder layers
    compiled (LoRA, DoRA, full fine-tuning; one process; runs long enough), else Liger's fused
    kernels when installed; no gradient
    checkpointing except for QLoRA (whose point is memory); accumulation steps folded into larger
    micro-batches (:func:`fold_accumulation` sizes them); the LM head and loss only at trained
    positions (:class:`TrainedPositions`).
    On CPU: what ftkit always did (AdamW, SDPA, no fused kernels, no checkpointing).
    """
    t = cfg.train
    cuda = resolve_device(cfg.model).type == "cuda"
    optimizer = t.optimizer if t.optimizer != "auto" else ("adamw_torch_fused" if cuda else "adamw_torch")
    ckpt = t.gradient_checkpointing if t.gradient_checkpointing is not None else (cuda and t.method == "qlora")
    attention = t.attention
    if attention == "auto":
        attention = "varlen" if cuda and t.packing and _varlen_fn() is not None else "sdpa"
    # compiled layers: measured on an H200 (bench/train_throughput.py: same losses as eager for LoRA,
    # DoRA and full fine-tuning); QLoRA's 4-bit layers stay eager
    # (several processes: not measured compiled with DDP/FSDP/DeepSpeed, so `auto` leaves them eager)
    short = est_train_seconds is not None and est_train_seconds < COMPILE_MIN_SECONDS
    wanted = t.compile if t.compile is not None else (cuda and not short and t.num_processes <= 1)
    compile_ = bool(wanted) and t.method != "qlora"
    kernels = t.kernels
    if kernels == "auto":
        kernels = "liger" if cuda and liger_available() and not compile_ else "none"
    merge = t.merge_accumulation if t.merge_accumulation is not None else (cuda and t.packing)
    # (Liger's fused linear cross-entropy replaces the model's forward: left as it computes)
    trained_only = (t.trained_logits_only if t.trained_logits_only is not None else cuda) and t.packing
    trained_only = trained_only and kernels != "liger+loss"
    return {"device": "cuda" if cuda else str(resolve_device(cfg.model)), "optimizer": optimizer,
            "gradient_checkpointing": bool(ckpt), "attention": attention, "kernels": kernels,
            "compile": compile_,
            "merge_accumulation": bool(merge and t.gradient_accumulation_steps > 1),
            "trained_logits_only": bool(trained_only),
            "micro_batch": t.batch_size, "accumulation": t.gradient_accumulation_steps}


def fold_accumulation(cfg: ExperimentConfig, plan: dict, lengths: list[int], free_bytes: int,
                      headroom: float = 0.9) -> dict:
    """With ``merge_accumulation``, the fewest accumulation steps (a divisor of the configured ones)
    whose larger micro-batch the memory estimate fits in ``headroom`` of the free memory.

    A packed micro-batch holds as many tokens as its examples, so it is sized by the largest token
    count of 256 random micro-batches of that many examples (drawn with a fixed seed), not by the
    mean: with long documents the largest batches are twice the mean or more, and a run meets its
    largest batches sooner or later. Compiled layers are estimated at their own (smaller) activation
    figure (:func:`ftkit.estimate.estimate`'s ``compiled``).
    """
    import dataclasses
    import random

    from .estimate import estimate
    from .modeling import resolve_model_path

    if not plan["merge_accumulation"] or not lengths:
        return plan
    t, path = cfg.train, resolve_model_path(cfg.model.name)
    accum = t.gradient_accumulation_steps
    for k in [d for d in range(accum, 0, -1) if accum % d == 0]:
        size = min(t.batch_size * k, len(lengths))
        rng = random.Random(0)
        largest = max(sum(rng.sample(lengths, size)) for _ in range(256))
        trial = dataclasses.replace(cfg, train=dataclasses.replace(t, batch_size=t.batch_size * k,
                                                                   gradient_accumulation_steps=accum // k))
        est = estimate(trial, path, sum(lengths), len(lengths), largest / size, compiled=bool(plan.get("compile")))
        if est.total_gb * 1024**3 <= headroom * free_bytes or k == 1:
            # the estimate for the micro-batch actually used (the pre-flight one is for the configured size)
            return {**plan, "micro_batch": t.batch_size * k, "accumulation": accum // k,
                    "folded_estimate_gb": round(est.total_gb, 2)}
    return plan


def fold_for_model(cfg: ExperimentConfig, planned: dict, applied: dict, lengths: list[int], free_bytes: int) -> dict:
    """:func:`fold_accumulation` for the loaded model: sized for compiled layers (which keep fewer
    activations) only where :func:`prepare_for_device` compiled them, so a model whose layers could
    not be compiled gets micro-batches that fit eager layers. ``free_bytes``: measured before loading
    (the estimate includes the weights)."""
    return fold_accumulation(cfg, {**planned, "compile": bool(applied.get("compiled_layers"))}, lengths, free_bytes)


def prepare_for_device(model, plan: dict) -> dict:
    """Apply a :func:`device_plan` to a loaded model (before adapters are added); returns what was
    applied (a piece that is unavailable for this model falls back to the plain path)."""
    applied = {"kernels": "none", "attention": getattr(model.config, "_attn_implementation", None)}
    if plan["kernels"] in ("liger", "liger+loss") and apply_fused_kernels(model, plan["kernels"] == "liger+loss"):
        applied["kernels"] = plan["kernels"]
    if plan.get("compile"):
        # on a GPU each compiled layer launches its kernels from generated C++ (Inductor's C++ wrapper)
        # rather than Python: the host launches ~3,000 kernels a step, and a step of short examples
        # waits on it (1.5B Bitext, against the Python wrapper in one process on two hosts: +4.8%,
        # +4.4%, -1.3%, +2.9%; mean +2.7%)
        cpp = plan.get("device") == "cuda"
        applied["compiled_layers"] = compile_layers(model, **({"options": {"cpp_wrapper": True}} if cpp else {}))
        applied["compile_wrapper"] = "cpp" if cpp and applied["compiled_layers"] else None
        applied["compiled_loss"] = compile_loss(model)
        if not applied["compiled_layers"]:
            log.warning("decoder layers not compiled (no *DecoderLayer list found): they run eager")
    applied["trained_logits_only"] = bool(plan.get("trained_logits_only")) and takes_logit_positions(model)
    if plan["attention"] == "varlen" and register_varlen_attention():
        model.config._attn_implementation = VARLEN
        applied["attention"] = VARLEN
    model._ftkit_applied = applied
    return applied


def compile_layers(model, **options) -> int:
    """torch.compile every decoder layer in place (one graph shared by the layers; dynamic shapes,
    as packed lengths change every step); the attention kernel call itself stays eager.
    ``options``: more ``torch.compile`` options (the bench's experiments)."""
    layers = next((m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)
                   and type(m[0]).__name__.endswith("DecoderLayer")), None)
    if layers is None:
        return 0
    for layer in layers:
        layer.compile(dynamic=True, **options)
    return len(layers)


def compile_loss(model) -> bool:
    """torch.compile the model's loss (transformers' ``loss_function``: the logits upcast to fp32,
    log-softmax, the targets picked). Compiled, the upcast and the softmax fuse into reductions over
    the bf16 logits: no fp32 copy of a tokens x vocabulary matrix is written, forward or backward
    (on a 152k vocabulary, 8 GB a step at 13k tokens). The maths is the same: the reductions run in fp32."""
    if not isinstance(getattr(type(model), "loss_function", None), property):
        return False
    model.loss_function = torch.compile(model.loss_function, dynamic=True)
    return True


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


def build_trainer(cfg: ExperimentConfig, paths: RunPaths, model, tokenizer, train_rows, val_rows,
                  plan: dict | None = None):
    """A configured transformers Trainer; kept separate so tests can inspect it.

    ``plan``: :func:`device_plan`'s choices (micro-batches sized by :func:`fold_accumulation`)."""
    from transformers import Trainer, TrainingArguments

    from .lean_trainer import LeanTrainer

    t = cfg.train
    device = resolve_device(cfg.model)
    plan = plan or device_plan(cfg)
    args = TrainingArguments(
        output_dir=str(paths.checkpoints_dir),
        per_device_train_batch_size=plan["micro_batch"],
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=plan["accumulation"],
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=0,  # set below, once the number of processes is known
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
        # a nan/inf loss is logged as it is: the Trainer's filter would hide it, and its check reads
        # the loss back to the host after every micro-batch, which leaves a GPU idle between steps
        logging_nan_inf_filter=False,
        seed=cfg.seed,
        data_seed=cfg.seed,
        full_determinism=t.deterministic,
        optim=plan["optimizer"],
        **_checkpointing_args(plan["gradient_checkpointing"]),
        **_sampling_args(t.group_by_length),
        neftune_noise_alpha=t.neftune_noise_alpha,
        use_cpu=device.type == "cpu",
        bf16=next(model.parameters()).dtype == torch.bfloat16,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        # batches are copied to the GPU from pinned memory without waiting: a blocking copy makes the
        # host wait for the previous step's kernels, and the GPU then waits for the host to launch more
        dataloader_pin_memory=device.type == "cuda",
        accelerator_config={"non_blocking": device.type == "cuda"},
        disable_tqdm=False,
    )
    # an int, worked out here: transformers 5 reads a float < 1 in warmup_steps as a ratio, 4.x as a
    # number of steps (0), and neither has a ratio field it reads the same way
    args.warmup_steps = warmup_steps(t.warmup_ratio, optimizer_steps(
        len(train_rows), plan["micro_batch"], plan["accumulation"], args.world_size, t.epochs, t.max_steps))
    from transformers import EarlyStoppingCallback

    callbacks = [CompleteCheckpointMarker()]
    if t.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience))
    trainer_class = LeanTrainer if plan["device"] == "cuda" else Trainer
    return trainer_class(
        model=model,
        callbacks=callbacks,
        args=args,
        train_dataset=TokenizedDataset(train_rows),
        eval_dataset=TokenizedDataset(val_rows) if val_rows else None,
        data_collator=make_collator(tokenizer.pad_token_id, cfg.train.packing,
                                    boundaries=plan["attention"] == "varlen",
                                    trained_logits_only=plan.get("applied_trained_logits_only", False)),
    )


def optimizer_steps(examples: int, micro_batch: int, accumulation: int, processes: int, epochs: float,
                    max_steps: int = -1) -> int:
    """The optimiser steps the Trainer takes: ``max_steps`` when positive, else ``epochs`` times the
    steps of one epoch, counted as transformers' Trainer counts them (each process gets
    ceil(examples / (micro_batch x processes)) micro-batches, the last one short; an epoch is
    ceil(micro-batches / accumulation) steps, at least one; epochs are rounded up to a whole step)."""
    if max_steps > 0:
        return max_steps
    micro_batches = math.ceil(examples / (micro_batch * processes))
    return math.ceil(epochs * max(math.ceil(micro_batches / accumulation), 1))


def warmup_steps(ratio: float, total_steps: int) -> int:
    """Warm-up steps for ``train.warmup_ratio``: ceil(ratio x total steps). The product is rounded to
    9 places first, so 0.07 x 100 (7.000000000000001 in floating point) gives 7 steps, not 8."""
    if not 0 <= ratio <= 1:
        raise ValueError(f"train.warmup_ratio: a share of the optimiser steps in [0, 1], got {ratio}")
    return math.ceil(round(ratio * total_steps, 9))


def _checkpointing_args(on: bool) -> dict:
    """Activation checkpointing for TrainingArguments under the name this transformers knows
    (``activation_checkpointing`` from 5.2x; ``gradient_checkpointing`` before, a deprecated alias since)."""
    import dataclasses

    from transformers import TrainingArguments

    name = "activation_checkpointing" if any(f.name == "activation_checkpointing"
                                             for f in dataclasses.fields(TrainingArguments)) else "gradient_checkpointing"
    return {name: on, f"{name}_kwargs": {"use_reentrant": False} if on else None}


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


def load_for_training(cfg: ExperimentConfig, base_path: str, plan: dict | None = None):
    """The model to train: 4-bit NF4 for QLoRA, otherwise in the configured dtype; adapters added.
    ``plan``: :func:`device_plan`'s choices (default: worked out from ``cfg``)."""
    method = cfg.train.method
    plan = plan or device_plan(cfg)
    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = load_4bit(base_path, cfg)
        if plan["device"] == "cuda":
            # frozen norms, embeddings and head stay bf16: prepare_model_for_kbit_training's fp32 copies
            # double their memory (2 GB more on an 8B model) and make the head's matmul an fp32 one
            for p in model.parameters():
                p.requires_grad_(False)
        else:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = load_model(base_path, cfg.model)
    model.config.use_cache = False
    prepare_for_device(model, plan)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model.train()
    return add_lora(model, cfg)


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
    device = resolve_device(cfg.model)
    held_before = free_leftovers(device)
    set_seed(cfg.seed, cfg.train.deterministic)
    base_path = resolve_model_path(cfg.model.name)
    tokenizer = load_tokenizer(paths.require(paths.tokenizer_dir, "02_format_conversion"), cfg.model)
    objective = cfg.train.objective
    train_rows = load_tokens(paths.require(paths.tokens("train"), "02_format_conversion"), objective=objective)
    val_rows = load_tokens(paths.require(paths.tokens("val"), "02_format_conversion"), cfg.train.max_eval_examples,
                           objective=objective)
    from .estimate import preflight

    # before any weight is loaded: stops early if it clearly won't fit
    lengths = [len(r["input_ids"]) for r in train_rows]
    plan = preflight(cfg, paths, lengths=lengths)
    log.info("pre-flight: ~%.2f GB needed of %.1f GB free, ~%.0f s estimated", plan["total_gb"], plan["free_gb"],
             plan["est_train_seconds"])
    free = int(plan["free_gb"] * 1024**3)
    planned = device_plan(cfg, plan["est_train_seconds"])
    model = load_for_training(cfg, base_path, planned)
    choices = fold_for_model(cfg, planned, getattr(model, "_ftkit_applied", {}), lengths, free)
    load_peak = peak_memory_mb(device)  # loading can peak above training (QLoRA quantises as it loads)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    choices.update({f"applied_{k}": v for k, v in getattr(model, "_ftkit_applied", {}).items()})
    log.info("device plan: %s", choices)
    packing_leak_max = check_packing(model) if cfg.train.packing else None
    trainable, total = count_parameters(model)
    log.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    trainer = build_trainer(cfg, paths, model, tokenizer, train_rows, val_rows, choices)
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
    train_peak = peak_memory_mb(device)
    if trainer.is_world_process_zero():
        write_log_csv(history, paths.train_log.with_suffix(".csv"))
    return trainer, {
        "train_loss": result.training_loss,
        "eval_loss": final_eval.get("eval_loss"),
        "train_tokens": tokens,
        "peak_memory_mb": max(load_peak, train_peak),
        "load_peak_memory_mb": load_peak,
        "memory_held_before_mb": held_before,
        "train_peak_memory_mb": train_peak if device.type == "cuda" else None,
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
        "device_plan": choices,
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
