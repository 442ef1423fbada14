"""Training speed on one GPU: the plain Hugging Face path (baseline) against ftkit's own GPU path.

In one process, for each model shape and data mix, it trains for ``--warmup`` steps, then times
``--steps`` more, for:

* **baseline**: what a typical tutorial does: transformers Trainer + PEFT LoRA (r=16, alpha 32,
  all linear layers, dropout 0: PEFT's default), bf16, SDPA attention, padding to the longest
  example of each batch (``DataCollatorForSeq2Seq``), no packing, gradient checkpointing on, AdamW;
* **stock**: what an informed user writes in ten lines (:func:`run_stock`): Trainer + PEFT with
  ``DataCollatorWithFlattening`` padding-free packing on SDPA, no gradient checkpointing,
  ``adamw_torch_fused``; for QLoRA a 4-bit base through ``prepare_model_for_kbit_training``
  (checkpointing on, as PEFT's guide does); its packing checked with ftkit's leak probe;
* **ftkit**: ``ftkit.train.training.run_training``, the function notebook 03 calls, with its defaults on a
  GPU (``ftkit.train.plan.device_plan``) and the same model, examples, micro-batch, learning rate,
  schedule and seed. Two things are changed around it, neither inside the timed steps: the
  pre-flight memory check only records its estimate (instead of stopping a run it thinks too big),
  and the LoRA initialisation is seeded just before the adapters are added, as the baseline's is;
* ablations (``--ablations``): ftkit with pieces of its GPU path switched off through the config,
  to show what each piece buys.

Models are real architecture shapes with random weights (speed does not depend on the values):
Llama-3.1-8B, Qwen2.5-1.5B and SmolLM2-135M. Examples are random token ids with realistic lengths:
``bitext`` draws (length, prompt length) pairs measured on the Bitext customer-support pairs with
SmolLM2's chat template (``bench/bitext_lengths.json``: lengths only, no text; loss on the reply);
``longdoc`` draws lengths log-uniformly between 256 and 4,096 tokens (loss on every token).

Useful tokens: every non-pad token of the timed steps, trained or not.

MFU, counted honestly. Useful FLOPs of a step are

    sum over its examples (length L, of which T positions predict a trained token) of
        L * (c * N_layers + 6 * N_lora)            matmuls of non-pad tokens only
      + T * c * N_head                             the LM head where its output is trained
      + 3 * 2 * L * (L + 1) * d_attn * n_layers    attention over the example's own causal triangle

with ``N_layers`` the weights of the decoder layers' matrix products (attention and MLP
projections), ``N_head`` the LM head's (not the embedding lookup), ``c`` = 4 for LoRA/QLoRA (forward, 2N, plus activation gradients,
2N; frozen weights get no weight gradients) and 6 for full fine-tuning (plus weight gradients, 2N),
``N_lora`` = r * (in + out) per adapted layer (forward, activation and weight gradients), and
``d_attn`` = heads * head_dim: the forward computes QK^T and PV over L(L+1)/2 query-key pairs at
4 * d_attn FLOPs a pair, and the backward twice that. The head's logits over prompt positions are
not useful work (nothing is learned from them; ftkit's GPU path does not compute them): rows
marked ``"mfu_formula": 2`` count the head over trained positions only, earlier rows over every
non-pad token (on Bitext 21% of the tokens are prompt: the old count is 1.5% higher on the 8B
shape, 3% on the 1.5B one). Recomputation (gradient checkpointing),
padding, the fp32 optimiser and the elementwise work are not counted. MFU = useful FLOPs / step
time / 989e12 (the H200's dense bf16 datasheet peak); ``of_matmul_peak`` is the same against the
~790 TFLOP/s a large bf16 matrix product measures on this GPU (``--measure-peak`` measures it).

Run: ``python bench/train_throughput.py [--tokenizer DIR]`` (``make bench-train``); writes
``bench/results/<date>-<gpu>.json``. ``--models``, ``--mixes``, ``--ablations`` and ``--append``
(keep other models' rows of today's file) split a run; each model's baseline and ftkit rows always
come from one process.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

DATASHEET_PEAK = 989e12  # H200/H100 SXM dense bf16, FLOP/s
MATMUL_PEAK = 790e12  # an 8192^3 bf16 matrix product measured on this H200

ARCHS = {  # (model_type, config): real architecture shapes
    "llama-3.1-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                   max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                                   tie_word_embeddings=False)),
    "qwen2.5-1.5b": ("qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                   max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                   tie_word_embeddings=True, use_sliding_window=False)),
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                   max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                                   tie_word_embeddings=True)),
}
MIXES = {"bitext": (8, 8), "longdoc": (2, 8)}  # data mix -> (micro-batch, accumulation steps), in examples
LORA = dict(r=16, alpha=32, dropout=0.0)  # PEFT's default dropout; the ablations show ftkit at 0.05

# ablations: ftkit with parts of its GPU path switched off (config overrides; "lora_dropout" sets the
# adapters' dropout instead, against the same dropout-0 baseline)
_OFF = {"attention": "sdpa", "kernels": "none", "optimizer": "adamw_torch", "merge_accumulation": False,
        "compile": False}
# ablation keys that are not ftkit config: run_ftkit switches these around ftkit.train.training.run_training
BENCH_SWITCHES = ("compiled_loss", "non_blocking", "traced_attention", "whole_decoder", "cuda_graphs",
                  "extra_warmup", "expandable_segments", "manual_gc", "stock_walks", "cpp_wrapper", "fused_lora_a")
ABLATIONS = {
    "packed-sdpa (ftkit before)": _OFF,
    "+ varlen attention": {**_OFF, "attention": "varlen"},
    "+ liger rmsnorm/swiglu": {**_OFF, "attention": "varlen", "kernels": "liger"},
    "+ liger incl. fused loss": {**_OFF, "attention": "varlen", "kernels": "liger+loss"},
    "+ fused adamw": {**_OFF, "attention": "varlen", "kernels": "liger", "optimizer": "adamw_torch_fused"},
    "+ folded micro-batches (not compiled)": {"compile": False},
    "ftkit at lora dropout 0.05": {"lora_dropout": 0.05},
    "ftkit, again": {},  # the default path a second time (with --profile: where its time goes)
    # ftkit's default with one of its pieces put back as the plain path has it (bench-side switches)
    "ftkit, loss not compiled": {"compiled_loss": False},
    "ftkit, blocking input copies": {"non_blocking": False},
    "ftkit, logits at every position": {"trained_logits_only": False},
    # micro-batches as the fold sized them before the compiled-LoRA memory figure (8B Bitext: 32 x 2)
    "ftkit, micro-batch 32 x 2": {"batch_size": 32, "gradient_accumulation_steps": 2, "merge_accumulation": False},
    # experiment: the varlen kernel (a torch custom op) traced into the compiled layers, so each layer
    # is one graph instead of two around an eager attention call
    "ftkit, attention traced into compiled layers": {"traced_attention": True},
    # experiment: the whole decoder (embeddings, every layer, final norm) one compiled region, with the
    # attention traced: fewer compiled-call boundaries and Python between layers for a host-bound step
    "ftkit, decoder compiled whole": {"traced_attention": True, "whole_decoder": True},
    # experiment: CUDA graphs (torch.compile's "reduce-overhead") for the compiled layers, so the host
    # launches one graph per layer instead of each kernel; packed rows padded to a multiple of 512 tokens
    # (a trailing segment that trains nothing) and the longest-example length rounded up to a power of
    # two, so that few distinct shapes are recorded; 6 more warm-up steps to record them before timing
    "ftkit, CUDA graphs on bucketed lengths": {"traced_attention": True, "cuda_graphs": 512, "extra_warmup": 6},
    # experiment: the CUDA caching allocator with expandable segments (packed lengths change every step;
    # fewer new cudaMalloc calls, which can stall the host, and less fragmentation)
    "ftkit, expandable segments": {"expandable_segments": True},
    # experiment: Python's cyclic garbage collector off during training (objects alive at the start
    # frozen out of its scans, a collection every 50 optimizer steps instead); a host-bound step
    # otherwise pauses for collections that walk every object the process holds
    "ftkit, manual gc": {"manual_gc": True},
    # the Trainer's per-step module walks as stock transformers does them (model.train(), the parameter
    # count for total_flos, clipping and zero_grad over every parameter): ftkit.train.lean_trainer does them once
    "ftkit, stock module walks": {"stock_walks": True},
    # the compiled layers launching their kernels from Inductor's Python wrapper (ftkit uses its C++
    # wrapper on a GPU: the 1.5B Bitext step leaves the GPU idle while the host launches ~3,000 kernels)
    "ftkit, Python wrapper": {"cpp_wrapper": False},
    # the LoRA A projections that read the same input (q/k/v; gate/up) as separate products, as PEFT runs
    # them (ftkit fuses each group into one: ftkit.train.lora_fusion)
    "ftkit, LoRA A not fused": {"fused_lora_a": False},
    # memory budgets (train.max_memory_gb): the plan for a 48 or 24 GB card, the allocator capped at it
    "ftkit, max_memory_gb 48": {"max_memory_gb": 48},
    "ftkit, max_memory_gb 24": {"max_memory_gb": 24},
}

# QLoRA on the Bitext mix: ftkit with its memory levers set by hand (what a memory budget chooses between)
QLORA_VARIANTS = {
    "ftkit qlora": {},  # the default plan: compiled layers, gradient checkpointing on
    "ftkit qlora, eager": {"compile": False},  # the default plan before 2026-12-02
    "ftkit qlora, eager, no checkpointing": {"compile": False, "gradient_checkpointing": False},
    "ftkit qlora, no checkpointing": {"gradient_checkpointing": False},
    "ftkit qlora, max_memory_gb 24": {"max_memory_gb": 24},  # planned for a 24 GB card, allocator capped there
}


# ---- data -----------------------------------------------------------------------------------------
def make_rows(mix: str, n: int, seed: int, vocab: int, zipf: bool = False) -> list[dict]:
    """``n`` examples of random token ids with the mix's lengths; labels as stage 02 writes them."""
    rng = random.Random(seed)
    if mix == "bitext":
        pairs = json.loads((HERE / "bitext_lengths.json").read_text())["pairs"]
        shapes = [tuple(rng.choice(pairs)) for _ in range(n)]
    elif mix == "longdoc":
        shapes = [(int(math.exp(rng.uniform(math.log(256), math.log(4096)))), 1) for _ in range(n)]
    elif mix.startswith("fixed"):  # fixed-<length>: every example that long, loss on every token
        shapes = [(int(mix.split("-")[1]), 1)] * n
    else:
        raise ValueError(mix)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for total, prompt in shapes:
        if zipf:  # a learnable unigram distribution over 2,000 ids, so the loss falls
            ids = (torch.multinomial(_zipf(2000), total, replacement=True, generator=g) + 100).tolist()
        else:
            ids = torch.randint(100, vocab, (total,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def _zipf(k: int) -> torch.Tensor:
    p = 1.0 / torch.arange(1, k + 1, dtype=torch.float64)
    return p / p.sum()


# ---- FLOPs ----------------------------------------------------------------------------------------
def shape_numbers(arch: str) -> dict:
    _, c = ARCHS[arch]
    h, i, n = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    hd = h // c["num_attention_heads"]
    dq, dkv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    linears = [(h, dq), (h, dkv), (h, dkv), (dq, h), (h, i), (h, i), (i, h)]  # q k v o gate up down
    per_layer = sum(a * b for a, b in linears)
    lora = LORA["r"] * sum(a + b for a, b in linears) * n
    return {"n_layers": per_layer * n, "n_head": h * c["vocab_size"], "n_lora": lora, "d_attn": dq, "layers": n}


def useful_flops(examples: list[tuple[int, int]], arch: str, method: str) -> float:
    """``examples``: (length, positions predicting a trained token) of each example; see the module docstring."""
    s = shape_numbers(arch)
    c = 6 if method == "full" else 4
    lora = 0 if method == "full" else 6 * s["n_lora"]
    return float(sum(L * (c * s["n_layers"] + lora) + T * c * s["n_head"] + 6 * L * (L + 1) * s["d_attn"] * s["layers"]
                     for L, T in examples))


# ---- timing ---------------------------------------------------------------------------------------
class Recorder:
    """Wraps a collator to record each batch's examples (length, positions predicting a trained
    token); a callback times the steps after warm-up (CUDA synchronised at both ends only)."""

    def __init__(self, collator, warmup: int, steps: int, accum: int = 1, profile: bool = False):
        self.collator, self.warmup, self.total, self.accum = collator, warmup, warmup + steps, accum
        self.profile, self.prof = profile, None
        self.batches: list[list[tuple[int, int]]] = []  # (length, trained positions) per example
        self.t0 = self.t1 = None
        self.losses: list[float] = []

    def __call__(self, batch):
        self.batches.append([(len(b["input_ids"]), sum(1 for x in b["labels"][1:] if x != -100)) for b in batch])
        return self.collator(batch)

    def callback(self):
        from transformers import TrainerCallback

        rec = self

        class _Timer(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == rec.warmup:
                    torch.cuda.synchronize()
                    if rec.profile:
                        rec.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
                        rec.prof.__enter__()
                    rec.t0 = time.perf_counter()
                elif state.global_step == rec.total:
                    torch.cuda.synchronize()
                    rec.t1 = time.perf_counter()
                    if rec.prof is not None:
                        rec.prof.__exit__(None, None, None)
                        print(kernel_summary(rec.prof, rec.t1 - rec.t0), flush=True)
                        rec.prof = None

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    rec.losses.append(logs["loss"])

        return _Timer()

    def result(self, arch: str, method: str) -> dict:
        a = self.accum  # step k (from 1) trains batches (k-1)*a .. k*a-1; the loader may read one ahead
        timed = self.batches[self.warmup * a:self.total * a]
        examples = [x for b in timed for x in b]
        tokens = sum(L for L, _ in examples)
        seconds = self.t1 - self.t0
        flops = useful_flops(examples, arch, method)
        return {"tokens_per_second": tokens / seconds, "step_time_s": seconds / (self.total - self.warmup),
                "mfu": flops / seconds / DATASHEET_PEAK, "of_matmul_peak": flops / seconds / MATMUL_PEAK,
                "useful_tflops_per_s": flops / seconds / 1e12, "timed_steps": self.total - self.warmup,
                "tokens_timed": tokens, "trained_positions_timed": sum(T for _, T in examples), "mfu_formula": 2}


def kernel_summary(prof, seconds: float, top: int = 25) -> str:
    """GPU kernel time of a profiled stretch: by class (matrix products, attention, the rest) and the
    top kernels, as shares of the wall time."""
    rows = [(e.key, e.self_device_time_total / 1e6, e.count) for e in prof.key_averages()
            if e.self_device_time_total > 0]
    def cls(name):
        n = name.lower()
        if any(k in n for k in ("gemm", "cutlass", "nvjet", "sm90_xmma", "matmul", "cublas")):
            return "matmul"
        if "flash" in n or "attention" in n or "fmha" in n:
            return "attention"
        return "other"
    by = {}
    for name, s, _ in rows:
        by[cls(name)] = by.get(cls(name), 0.0) + s
    busy = sum(by.values())
    lines = [f"profile: wall {seconds:.3f} s, GPU busy {busy:.3f} s ({busy / seconds:.0%}); "
             + ", ".join(f"{k} {v:.3f} s ({v / seconds:.0%})" for k, v in sorted(by.items(), key=lambda x: -x[1]))]
    for name, s, n in sorted(rows, key=lambda r: -r[1])[:top]:
        lines.append(f"  {s:8.4f} s {s / seconds:5.1%} x{n:<6} [{cls(name)}] {name[:110]}")
    lines += idle_gaps(prof)
    return "\n".join(lines)


def idle_gaps(prof, top: int = 10) -> list[str]:
    """Where the GPU sat idle in a profiled stretch: the gaps between kernels (merged over streams), by
    size, and the largest with the kernels either side, so a host stall shows where in the step it is."""
    try:
        events = [(e.start_ns(), e.start_ns() + e.duration_ns(), e.name()) for e in prof.profiler.kineto_results.events()
                  if e.device_type() == torch.autograd.DeviceType.CUDA and e.duration_ns() > 0]
    except Exception as e:  # noqa: BLE001  (the profiler's result API differs between torch versions)
        return [f"  idle gaps: not read ({type(e).__name__}: {e})"]
    events.sort()
    gaps, end, prev = [], None, ""
    for start, stop, name in events:
        if end is not None and start > end:
            gaps.append(((start - end) / 1e6, prev, name))
        if end is None or stop > end:
            end, prev = stop, name
    total = sum(g for g, _, _ in gaps)
    bands = []
    for lo, hi in [(0, 0.05), (0.05, 1), (1, 10), (10, float("inf"))]:
        band = [g for g, _, _ in gaps if lo <= g < hi]
        bands.append(f"{lo}-{hi} ms: {sum(band) / 1e3:.3f} s ({len(band)})")
    out = [f"  idle: {total / 1e3:.3f} s in {len(gaps)} gaps; " + ", ".join(bands)]
    for g, a, b in sorted(gaps, reverse=True)[:top]:
        out.append(f"  gap {g:8.2f} ms after {a[:60]} before {b[:60]}")
    return out


def free_gpu():
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


# ---- models ---------------------------------------------------------------------------------------
def build_model(arch: str, tok, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, kw = ARCHS[arch]
    config = AutoConfig.for_model(model_type, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id, **kw)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(old)
    return model.to(torch.bfloat16)


def model_dir_for(arch: str, tok, work: Path, model=None) -> Path:
    """The directory ftkit loads ``arch`` from, written once per run (from ``model`` when given, so
    the baseline and ftkit start from the same weights)."""
    model_dir = work / f"model-{arch}"
    if not model_dir.exists():
        (model if model is not None else build_model(arch, tok)).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    return model_dir


# ---- baseline -------------------------------------------------------------------------------------
def run_baseline(model, tok, rows, arch, batch, lr, warmup, steps, seed, out, accum=1, dropout=LORA["dropout"],
                 logging_steps=None):
    from transformers import DataCollatorForSeq2Seq

    model.config.use_cache = False
    model.enable_input_require_grads()  # as tutorials do for gradient checkpointing with PEFT
    model = _with_lora(model, seed, dropout)
    rec = Recorder(DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100), warmup, steps, accum)
    peak = _hf_train(model, rec, rows, out, batch, lr, seed, accum, bf16=torch.cuda.is_available(),
                     gradient_checkpointing=True, logging_steps=logging_steps or 10_000)
    return rec, peak


def _with_lora(model, seed, dropout=LORA["dropout"]):
    """PEFT LoRA on every linear layer, seeded: the adapters of the baseline and stock rows."""
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed as hf_set_seed

    hf_set_seed(seed)
    return get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=dropout,
                                            target_modules="all-linear", task_type="CAUSAL_LM", bias="none"))


def _hf_train(model, rec, rows, out, batch, lr, seed, accum, **options) -> float:
    """transformers' Trainer on ``rows`` through the recording collator ``rec`` for its warm-up and timed
    steps (cosine schedule, no weight decay, clipping at 1); ``options``: the TrainingArguments that
    differ between set-ups. Returns the peak GPU memory in GB."""
    from transformers import Trainer, TrainingArguments

    from ftkit.core.batches import TokenizedDataset

    options.setdefault("logging_steps", 10_000)
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=batch, learning_rate=lr,
                             gradient_accumulation_steps=accum, max_steps=rec.total, lr_scheduler_type="cosine",
                             warmup_steps=0.05, weight_decay=0.0, max_grad_norm=1.0, save_strategy="no",
                             report_to="none", seed=seed, data_seed=seed, remove_unused_columns=False,
                             dataloader_num_workers=0, disable_tqdm=True, **options)
    trainer = Trainer(model=model, args=args, train_dataset=TokenizedDataset(rows), data_collator=rec,
                      callbacks=[rec.callback()])
    trainer.train()
    del trainer
    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else 0.0


# ---- stock: what an informed user writes in ten lines ---------------------------------------------
def run_stock(model, tok, rows, arch, batch, lr, warmup, steps, seed, out, accum=1, model_dir=None, qlora=False):
    """Trainer + PEFT LoRA (the baseline's adapters) with the stock speed options transformers offers:
    padding-free packing (``DataCollatorWithFlattening``: one row, ``position_ids`` restarting at each
    example, from which SDPA's block-diagonal mask is built), no gradient checkpointing,
    ``adamw_torch_fused``, bf16. ``qlora``: the same on a 4-bit NF4 base loaded from ``model_dir``
    (double quantisation, bf16 compute) through ``prepare_model_for_kbit_training``, which turns gradient
    checkpointing on, as PEFT's QLoRA guide does. Returns (recorder, peak GB, packing leak): ftkit's
    packing probe (``ftkit.train.packing.packing_leak``) runs on the adapted model before training."""
    from peft import prepare_model_for_kbit_training
    from transformers import DataCollatorWithFlattening

    from ftkit.train.packing import packing_leak

    if qlora:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=torch.bfloat16,
                                                     attn_implementation="sdpa", device_map={"": 0})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model.config.use_cache = False
    model = _with_lora(model, seed)
    model.eval()
    leak = packing_leak(model)
    model.train()
    rec = Recorder(DataCollatorWithFlattening(), warmup, steps, accum)
    peak = _hf_train(model, rec, rows, out, batch, lr, seed, accum, bf16=torch.cuda.is_available(), gradient_checkpointing=qlora,
                     optim="adamw_torch_fused")
    return rec, peak, leak


# ---- ftkit ----------------------------------------------------------------------------------------
def run_ftkit(model_dir, tok_dir, rows, arch, method, batch, lr, warmup, steps, seed, out, accum=1,
              train_overrides=None, dropout=LORA["dropout"], logging_steps=None, profile=False):
    """``ftkit.train.training.run_training`` on a prepared experiment directory; see the module docstring."""
    from ftkit.core.config import load_config
    from ftkit.core.files import write_jsonl
    from ftkit.core.paths import RunPaths
    from ftkit.train.recipe import Recipe
    from ftkit.train.trainer import set_seed
    from ftkit.train.training import run_training

    train_overrides = dict(train_overrides or {})
    dropout = train_overrides.pop("lora_dropout", dropout)
    switches = {k: train_overrides.pop(k) for k in BENCH_SWITCHES if k in train_overrides}
    cfg = load_config(experiment="bench", seed=seed, outputs_dir=str(out), model={"name": str(model_dir)},
                      train={"method": method, "batch_size": batch, "gradient_accumulation_steps": accum,
                             # as in a run long enough to win back the compile time (what `auto` does
                             # there); this short timed run would otherwise not compile
                             "compile": True,
                             "learning_rate": lr,
                             "max_steps": warmup + switches.get("extra_warmup", 0) + steps,
                             "logging_steps": logging_steps or 10_000, "eval_steps": 0, "save_steps": 0,
                             "resume": "never", "lora": {**LORA, "dropout": dropout}, **(train_overrides or {})})
    paths = RunPaths(Path(out), cfg.experiment)
    paths.formatted_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(paths.tokens("train"), rows)
    write_jsonl(paths.tokens("val"), [])
    if not paths.tokenizer_dir.exists():
        import shutil

        shutil.copytree(tok_dir, paths.tokenizer_dir)

    recs, plans = [], {}
    warmup = warmup + switches.get("extra_warmup", 0)
    stock = Recipe()

    class BenchRecipe(Recipe):
        """Stage 03's pieces, timed (a recording collator and callback) and switched by the ablation."""

        lean_trainer = not switches.get("stock_walks")

        def collator(self, *a, **k):
            inner = stock.collator(*a, **k)
            if switches.get("cuda_graphs"):
                inner = Bucketed(inner, switches["cuda_graphs"])
            recs.append(Recorder(inner, warmup, steps, profile=profile))
            return recs[-1]

        def trainer(self, trainer):
            recs[-1].accum = trainer.args.gradient_accumulation_steps
            trainer.add_callback(recs[-1].callback())
            if switches.get("compiled_loss") is False:
                base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
                base.__dict__.pop("_loss_function", None)
            if switches.get("non_blocking") is False:
                trainer.accelerator.dataloader_config.non_blocking = False
            if switches.get("cuda_graphs"):
                trainer.add_callback(step_marker())
            if switches.get("manual_gc"):
                trainer.add_callback(manual_gc())
            return trainer

        def check_fits(self, e, c, free):  # timed runs go on whatever the estimate says
            plans["preflight_total_gb"] = e.total_gb

        def add_adapters(self, model, c):
            set_seed(seed)  # the same adapter initialisation as the baselines
            return stock.add_adapters(model, c)

        def fuse_lora_a(self, model):
            return 0 if switches.get("fused_lora_a") is False else stock.fuse_lora_a(model)

        def register_attention(self):
            if switches.get("traced_attention"):
                from ftkit.train.kernels import register_varlen_attention

                return register_varlen_attention(traced=True)
            return stock.register_attention()

        def compile_layers(self, model, **kw):
            if switches.get("whole_decoder"):
                return compile_decoder(model)
            if switches.get("cuda_graphs"):
                return stock.compile_layers(model, mode="reduce-overhead")
            if switches.get("cpp_wrapper") is False:
                return stock.compile_layers(model)
            return stock.compile_layers(model, **kw)

    if switches.get("expandable_segments"):
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    try:
        trained, metrics = run_training(cfg, paths, BenchRecipe())
    finally:
        if switches.get("expandable_segments"):
            torch.cuda.memory._set_allocator_settings("expandable_segments:False")
    # stage 03 resets the peak after loading; its own figure is the larger of loading and training
    peak = metrics["peak_memory_mb"] * 2**20 / 1e9
    del trained
    return recs[-1], peak, {**plans, "load_peak_memory_gb": metrics["load_peak_memory_mb"] * 2**20 / 1e9,
                            "device_plan": metrics["device_plan"], "compiler": compiler_counts()}


class Bucketed:
    """The 'CUDA graphs' experiment's collator wrapper: pads a packed row to a multiple of ``multiple``
    tokens with one trailing segment that trains nothing (labels -100, its own boundary, positions from
    0) and rounds the longest-example length up to a power of two, so that CUDA graphs are recorded for
    a few shapes rather than every step. The padding is not counted as useful tokens (the Recorder
    counts the examples)."""

    def __init__(self, collator, multiple: int):
        self.collator, self.multiple = collator, multiple

    def __call__(self, features):
        b = self.collator(features)
        ids = b["input_ids"]
        if ids.shape[0] != 1:
            return b
        n = ids.shape[1]
        pad = (n // self.multiple + 1) * self.multiple - n  # at least one token: a fixed segment count
        b["input_ids"] = torch.cat([ids, ids.new_zeros(1, pad)], 1)
        b["labels"] = torch.cat([b["labels"], b["labels"].new_full((1, pad), -100)], 1)
        if "position_ids" in b:
            b["position_ids"] = torch.cat([b["position_ids"], torch.arange(pad, dtype=b["position_ids"].dtype)[None]], 1)
        for k in ("cu_seq_lens_q", "cu_seq_lens_k"):
            if k in b:
                b[k] = torch.cat([b[k], b[k].new_tensor([n + pad])])
        for k in ("max_length_q", "max_length_k"):
            if k in b:
                b[k] = 1 << (max(int(b[k]), pad, 128) - 1).bit_length()
        return b


def step_marker():
    """A Trainer callback that tells CUDA graph trees where a training step begins (the outputs of
    the previous step's graphs may then be overwritten)."""
    from transformers import TrainerCallback

    class _StepMarker(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            torch.compiler.cudagraph_mark_step_begin()

    return _StepMarker()


def manual_gc(every: int = 50):
    """The 'manual gc' experiment's callback: automatic collection off for the run, the objects alive
    at its start frozen (never scanned again), a young-generation collection every ``every`` steps."""
    from transformers import TrainerCallback

    class _ManualGC(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            gc.collect()
            gc.freeze()
            gc.disable()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % every == 0:
                gc.collect(1)

        def on_train_end(self, args, state, control, **kw):
            gc.enable()
            gc.unfreeze()

    return _ManualGC()


def compile_decoder(model, **_) -> int:
    """The 'decoder compiled whole' experiment: the decoder stack under the LM head compiled as one
    region instead of each layer on its own; returns the layer count like ``ftkit.train.kernels.compile_layers``."""
    decoder = model.get_decoder()
    decoder.compile(dynamic=True)
    return len(decoder.layers)


def compiler_counts() -> dict:
    """torch.compile's counters so far in this process (graphs, graph breaks, recompilations): a
    layer that keeps recompiling, or falls back to eager, shows here."""
    try:
        from torch._dynamo.utils import counters
    except Exception:  # noqa: BLE001
        return {}
    stats = dict(counters.get("stats", {}))
    return {"unique_graphs": stats.get("unique_graphs", 0), "calls_captured": stats.get("calls_captured", 0),
            "graph_breaks": sum(counters.get("graph_break", {}).values()),
            "recompiles": sum(counters.get("recompiles", {}).values())}


def _run_label() -> str:
    """Which code a row comes from: the git commit when the checkout has one."""
    import subprocess

    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True).stdout.strip()
        return f"commit {sha}" + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "this invocation (no git checkout)"


RUN_LABEL = _run_label()


# ---- main -----------------------------------------------------------------------------------------
def record(runs, **kw):
    kw.setdefault("run", RUN_LABEL)
    runs.append(kw)
    print(json.dumps(kw), flush=True)


def same_maths(tok, tok_dir, work, steps=50, seed=0, lr=1e-3, batch=4, accum=4) -> dict:
    """135M shape: the first ``steps`` losses of the baseline and of ftkit's GPU path on the same
    examples, order, seed and initial weights. LoRA dropout is 0 for both: dropout draws masks whose
    shape follows the batch layout (padded vs packed), so even identical maths would differ there."""
    arch = "smollm2-135m"
    rows = make_rows("bitext", steps * batch * accum, seed, ARCHS[arch][1]["vocab_size"], zipf=True)
    model = build_model(arch, tok)
    model_dir = model_dir_for(arch, tok, work, model)
    base, _ = run_baseline(model, tok, rows, arch, batch, lr, 0, steps, seed, work / "sm-base", accum=accum,
                           dropout=0.0, logging_steps=1)
    free_gpu()
    ours, _, plan = run_ftkit(model_dir, tok_dir, rows, arch, "lora", batch, lr, 0, steps, seed, work / "sm-ftkit",
                              accum=accum, dropout=0.0, logging_steps=1)
    free_gpu()
    a, b = base.losses, ours.losses
    rel = [abs(x - y) / abs(x) for x, y in zip(a, b, strict=True)]
    tolerance = 0.02
    n = steps * batch * accum  # examples seen, in order
    return {"model": arch, "steps": steps, "learning_rate": lr, "micro_batch": batch, "accumulation": accum,
            "same_examples_in_order": sum(base.batches, [])[:n] == sum(ours.batches, [])[:n],
            "loss_baseline": a, "loss_ftkit": b, "max_rel_diff": max(rel), "mean_rel_diff": sum(rel) / len(rel),
            "tolerance_rel_per_step": tolerance, "within_tolerance": max(rel) <= tolerance,
            "loss_first_last_baseline": [a[0], a[-1]], "loss_first_last_ftkit": [b[0], b[-1]],
            "device_plan": plan["device_plan"]}


def compile_check(tok, tok_dir, work, steps=20, seed=0, lr=1e-3, batch=4, accum=4,
                  methods=("lora", "full", "dora", "qlora")) -> list[dict]:
    """135M shape, per method: ftkit's GPU path with compiled layers against the same path eager,
    on the same examples and seed: loss curves (same maths) and tokens/s."""
    arch = "smollm2-135m"
    rows = make_rows("bitext", (steps + 2) * batch * accum, seed, ARCHS[arch][1]["vocab_size"], zipf=True)
    model_dir = model_dir_for(arch, tok, work)
    out = []
    for method in methods:
        res = {}
        for compiled in (False, True):
            free_gpu()
            rec, peak, plan = run_ftkit(model_dir, tok_dir, rows, arch, method, batch, lr, 2, steps, seed,
                                        work / f"cc-{method}-{compiled}", accum=accum, dropout=0.0, logging_steps=1,
                                        train_overrides={"compile": compiled, "kernels": "none"})
            res[compiled] = (rec, rec.result(arch, method), peak, plan)
        a, b = res[False][0].losses, res[True][0].losses
        rel = [abs(x - y) / abs(x) for x, y in zip(a, b, strict=True)]
        out.append({"model": arch, "method": method, "steps": steps + 2, "max_rel_loss_diff": max(rel),
                    "loss_first_last_eager": [a[0], a[-1]], "loss_first_last_compiled": [b[0], b[-1]],
                    "tokens_per_second_eager": res[False][1]["tokens_per_second"],
                    "tokens_per_second_compiled": res[True][1]["tokens_per_second"],
                    "speedup": res[True][1]["tokens_per_second"] / res[False][1]["tokens_per_second"],
                    "peak_memory_gb_eager": res[False][2], "peak_memory_gb_compiled": res[True][2],
                    "compiler": res[True][3]["compiler"]})
        print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", default=None, help="a tokenizer directory (default: the embedded SmolLM2's)")
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-1.5b,llama-3.1-8b")
    ap.add_argument("--mixes", default="bitext,longdoc")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ablations", default="qwen2.5-1.5b,llama-3.1-8b", help="models to ablate on the bitext mix")
    ap.add_argument("--ablation-names", default="all", help=f"'all' or ';'-separated of: {'; '.join(ABLATIONS)}")
    ap.add_argument("--variants", default="baseline,stock,ftkit")
    ap.add_argument("--append", action="store_true", help="keep other models' runs already in today's file")
    ap.add_argument("--qlora", default="llama-3.1-8b", help="models for QLoRA at 2,048-token micro-batches")
    ap.add_argument("--qlora-fixed", action=argparse.BooleanOptionalAction, default=True,
                    help="QLoRA at 2,048-token micro-batches (stock and ftkit) for the --qlora models")
    ap.add_argument("--qlora-bitext", default="", help="';'-separated QLoRA variants on the Bitext mix "
                    f"(stock and ftkit ones: {'; '.join(QLORA_VARIANTS)}), for the --qlora models")
    ap.add_argument("--same-maths", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--measure-peak", action="store_true")
    ap.add_argument("--compile-check", action=argparse.BooleanOptionalAction, default=True,
                    help="135M: compiled vs eager layers for LoRA, full fine-tuning, DoRA and QLoRA")
    ap.add_argument("--compile-methods", default="lora,full,dora,qlora")
    ap.add_argument("--profile", action="store_true",
                    help="print the GPU kernel time of the ablation rows' timed steps (e.g. of 'ftkit, again')")
    ap.add_argument("--work", default=None, help="scratch directory (models are saved there)")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()

    import peft
    import transformers
    from transformers import AutoTokenizer

    from ftkit.core.modeling import prepare_tokenizer

    if args.tokenizer is None:
        from ftkit.core.modeling import EMBEDDED, resolve_model_path

        args.tokenizer = resolve_model_path(EMBEDDED)
    work = Path(args.work or tempfile.mkdtemp(prefix="ftkit-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    prepare_tokenizer(tok)
    gpu = torch.cuda.get_device_name(0)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                "cuda": torch.version.cuda}
    for name in ("liger_kernel", "bitsandbytes", "triton"):
        try:
            versions[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001
            versions[name] = f"absent ({type(e).__name__})"
    result = {"gpu": gpu, "date": dt.date.today().isoformat(), "versions": versions,
              "setup": {"warmup_steps": args.warmup, "timed_steps": args.steps, "learning_rate": args.lr,
                        "lora": LORA, "mixes": {m: {"micro_batch": b, "accumulation": a} for m, (b, a) in MIXES.items()},
                        "datasheet_peak_flops": DATASHEET_PEAK, "matmul_peak_flops": MATMUL_PEAK},
              "runs": [], "ablations": []}
    if args.measure_peak:
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            a @ a
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
        result["setup"]["matmul_measured_flops"] = 2 * 8192**3 * 10 / (time.perf_counter() - t)
        del a

    common = dict(lr=args.lr, warmup=args.warmup, steps=args.steps, seed=args.seed)
    if args.same_maths:
        result["same_maths"] = sm = same_maths(tok, args.tokenizer, work)
        print(json.dumps({k: v for k, v in sm.items() if not k.startswith("loss_")}), flush=True)

    if args.compile_check:
        result["compile_check"] = compile_check(tok, args.tokenizer, work, methods=args.compile_methods.split(","))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{result['date']}-{re.sub(r'[^a-z0-9]+', '-', gpu.lower()).strip('-')}.json"
    if args.append and path.exists():  # another invocation's models, kept; this one's replace theirs
        old = json.loads(path.read_text())
        mine = set(args.models.split(","))
        mixes = set(args.mixes.split(","))
        result["runs"] = [r for r in old.get("runs", []) if r["model"] not in mine
                          or (r["data"] not in mixes and r["method"] == "lora")
                          or (r["method"] == "qlora" and r["model"] not in args.qlora.split(","))]
        names = list(ABLATIONS) if args.ablation_names == "all" else args.ablation_names.split(";")
        redo = {(m, n) for m in mine & set(args.ablations.split(",")) for n in names}
        result["ablations"] = [r for r in old.get("ablations", []) if (r["model"], r["variant"]) not in redo]
        for key in ("same_maths", "compile_check", "notes"):  # notes: written by hand, about earlier rows
            if key in old and key not in result:
                result[key] = old[key]

    def save():
        path.write_text(json.dumps(result, indent=1))

    for arch in args.models.split(","):
        vocab = ARCHS[arch][1]["vocab_size"]
        for mix in filter(None, args.mixes.split(",")):
            batch, accum = MIXES[mix]
            rows = make_rows(mix, (args.warmup + args.steps + 2) * batch * accum, args.seed, vocab)
            free_gpu()
            model = build_model(arch, tok)
            model_dir = model_dir_for(arch, tok, work, model)
            base = dict(model=arch, method="lora", micro_batch=batch, accumulation=accum,
                        seq_len=max(len(r["input_ids"]) for r in rows), data=mix)
            b = {"tokens_per_second": float("nan")}
            if "baseline" in args.variants.split(","):
                rec, peak = run_baseline(model, tok, rows, arch, batch, out=work / "base", accum=accum, **common)
                b = {**base, "variant": "baseline", **rec.result(arch, "lora"), "peak_memory_gb": peak}
                record(result["runs"], **b)
                save()
            del model
            free_gpu()
            st = {"tokens_per_second": float("nan")}
            if "stock" in args.variants.split(","):
                rec, peak, leak = run_stock(build_model(arch, tok), tok, rows, arch, batch, out=work / "stock",
                                            accum=accum, **common)
                st = {**base, "variant": "stock", **rec.result(arch, "lora"), "peak_memory_gb": peak,
                      "packing_leak_max_logit_diff": leak}
                st["ratio_to_baseline"] = st["tokens_per_second"] / b["tokens_per_second"]
                record(result["runs"], **st)
                save()
                free_gpu()
            if "ftkit" not in args.variants.split(","):
                bitext_rows, bitext_base, bitext_stock, bitext_info = rows, b, st, base
                continue
            rec, peak, plan = run_ftkit(model_dir, args.tokenizer, rows, arch, "lora", batch, out=work / "ftkit",
                                        accum=accum, **common)
            f = {**base, "variant": "ftkit", **rec.result(arch, "lora"), "peak_memory_gb": peak, **plan}
            f["ratio_to_baseline"] = f["tokens_per_second"] / b["tokens_per_second"]
            f["ratio_to_stock"] = f["tokens_per_second"] / st["tokens_per_second"]
            record(result["runs"], **f)
            save()
            if mix == "bitext":
                bitext_rows, bitext_base, bitext_stock, bitext_info = rows, b, st, base
        model_dir = model_dir_for(arch, tok, work)  # written by the LoRA rows above, or now (no mixes)
        if arch in args.qlora.split(",") and args.qlora_fixed:
            free_gpu()
            rows = make_rows("fixed-2048", (args.warmup + args.steps + 2), args.seed, vocab)
            q = dict(model=arch, method="qlora", micro_batch=1, accumulation=1, seq_len=2048, data="fixed-2048")
            qs = {"tokens_per_second": float("nan")}
            if "stock" in args.variants.split(","):
                rec, peak, leak = run_stock(None, tok, rows, arch, 1, out=work / "qstock", model_dir=model_dir,
                                            qlora=True, **common)
                qs = {**q, "variant": "stock", **rec.result(arch, "qlora"), "peak_memory_gb": peak,
                      "packing_leak_max_logit_diff": leak}
                record(result["runs"], **qs)
                save()
                free_gpu()
            rec, peak, plan = run_ftkit(model_dir, args.tokenizer, rows, arch, "qlora", 1, out=work / "qlora",
                                        **common)
            record(result["runs"], **q, variant="ftkit", **rec.result(arch, "qlora"), peak_memory_gb=peak,
                   ratio_to_stock=rec.result(arch, "qlora")["tokens_per_second"] / qs["tokens_per_second"], **plan)
            save()
        if arch in args.qlora.split(",") and args.qlora_bitext:
            batch, accum = MIXES["bitext"]
            rows = make_rows("bitext", (args.warmup + args.steps + 2) * batch * accum, args.seed, vocab)
            q = dict(model=arch, method="qlora", micro_batch=batch, accumulation=accum,
                     seq_len=max(len(r["input_ids"]) for r in rows), data="bitext")
            qs = {"tokens_per_second": float("nan")}
            for name in args.qlora_bitext.split(";"):
                free_gpu()
                try:
                    if name == "stock":
                        rec, peak, leak = run_stock(None, tok, rows, arch, batch, out=work / "qstock", accum=accum,
                                                    model_dir=model_dir, qlora=True, **common)
                        qs = r = {**q, "variant": "stock", **rec.result(arch, "qlora"), "peak_memory_gb": peak,
                                  "packing_leak_max_logit_diff": leak}
                    else:
                        rec, peak, plan = run_ftkit(model_dir, args.tokenizer, rows, arch, "qlora", batch,
                                                    out=work / "qlora", accum=accum,
                                                    train_overrides=QLORA_VARIANTS[name], **common)
                        r = {**q, "variant": name, "overrides": QLORA_VARIANTS[name], **rec.result(arch, "qlora"),
                             "peak_memory_gb": peak, **plan}
                        r["ratio_to_stock"] = r["tokens_per_second"] / qs["tokens_per_second"]
                except Exception as e:  # noqa: BLE001  (a variant that fails is recorded, not fatal)
                    r = {**q, "variant": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                record(result["runs"], **r)
                save()
        if arch in args.ablations.split(",") and "bitext" in args.mixes.split(","):
            batch, accum = MIXES["bitext"]
            names = list(ABLATIONS) if args.ablation_names == "all" else args.ablation_names.split(";")
            for name in names:
                free_gpu()
                t = time.perf_counter()
                try:
                    rec, peak, plan = run_ftkit(model_dir, args.tokenizer, bitext_rows, arch, "lora", batch,
                                                out=work / "abl", accum=accum, train_overrides=ABLATIONS[name],
                                                profile=args.profile, **common)
                except Exception as e:  # noqa: BLE001  (an ablation that fails is recorded, not fatal)
                    record(result["ablations"], **bitext_info, variant=name, overrides=ABLATIONS[name],
                           error=f"{type(e).__name__}: {str(e)[:300]}")
                    save()
                    continue
                r = {**bitext_info, "variant": name, "wall_s_incl_load_and_compile": time.perf_counter() - t,
                     "overrides": ABLATIONS[name], **rec.result(arch, "lora"), "peak_memory_gb": peak, **plan}
                r["ratio_to_baseline"] = r["tokens_per_second"] / bitext_base["tokens_per_second"]
                r["ratio_to_stock"] = r["tokens_per_second"] / bitext_stock["tokens_per_second"]
                record(result["ablations"], **r)
                save()
        free_gpu()

    save()
    print(f"wrote {path}")
    print(table(result))


def table(result: dict) -> str:
    lines = [f"{'model':14} {'method':6} {'data':10} {'variant':28} {'tok/s':>9} {'MFU':>6} {'peak GB':>8} {'x base':>7} {'x stock':>7}"]
    for r in result["runs"] + result["ablations"]:
        if "error" in r:
            lines.append(f"{r['model']:14} {r['method']:6} {r['data']:10} {r['variant']:28} failed: {r['error'][:60]}")
            continue
        lines.append(f"{r['model']:14} {r['method']:6} {r['data']:10} {r['variant']:28} {r['tokens_per_second']:9,.0f} "
                     f"{r['mfu']:6.1%} {r['peak_memory_gb']:8.1f} {r.get('ratio_to_baseline', float('nan')):7.2f} "
                     f"{r.get('ratio_to_stock', float('nan')):7.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
