"""One typed configuration for a whole experiment, validated at the boundary.

One module because the whole configuration is read in one place: every section, its defaults and
the checks between sections (docs/configuration.md is generated from it).

Defaults live here, in code. A parameters YAML (through papermill's parameters cell) only holds
the values that differ. :func:`load_config` deep-merges those values onto the defaults, applies
dotted ``overrides`` and checks every key and type, reporting *all* problems at once, with the
closest valid key suggested for a typo::

    >>> load_config(train={"learnin_rate": 1e-4})
    Traceback (most recent call last):
    ...
    ftkit.core.config.ConfigError: Config is not well-formed, found the following errors:
      - train.learnin_rate: unknown key; did you mean 'learning_rate'? ...
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

DEMO_DATA = "demo"
DEMO_PREFERENCE_DATA = "demo-preference"  # the demo's preference pairs (OpenAI DPO JSONL)
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_k_m")


# A field's ``metadata`` may carry a hint for the notebook form (ftkit.ui.parameter_form), never a check:
# "slider": (low, high, step) for a bounded number, "log_slider": (low, high) as powers of ten.
# load_config's checks below are what decide validity; a value outside a slider widens it.


class ConfigError(ValueError):
    """Raised when a configuration is not well-formed; lists every problem found."""

    def __init__(self, errors: list[str], source: str | None = None):
        self.errors = errors
        where = f" ({source})" if source else ""
        lines = "\n".join(f"  - {e}" for e in errors)
        super().__init__(f"Config is not well-formed{where}, found the following errors:\n{lines}")


@dataclass
class ModelConfig:
    """Which model to fine-tune and how to load it."""

    name: str = "smollm2-135m-instruct"
    """`smollm2-135m-instruct` (embedded), `tiny-random` (tests), a local path or a Hugging Face id."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """`auto`: bfloat16 on a GPU that supports it and on a CPU with AVX512-BF16 or AMX (full fine-tuning
    there stays float32), float32 otherwise."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    trust_remote_code: bool = False
    """Run the Python code a model repository ships (its own modelling files) when loading it: code from
    the model's authors runs on this machine with your data. Only for a model whose code you trust and
    need (transformers has no class for it); report 03 shows the setting."""
    allow_pickle_weights: bool = False
    """Weights load from safetensors files only. PyTorch pickle checkpoints (`pytorch_model.bin`, `.pt`)
    can run code when they are loaded; true accepts them too (a model you trust that has no safetensors)."""
    revision: str | None = None


@dataclass
class DataConfig:
    """Stage 01: where the raw data is, how to read, clean and split it."""

    path: Any = DEMO_DATA
    """`demo` (the shipped sample-data generator), a file, a folder, a glob, or a list of those:
    JSONL, JSON, CSV/TSV, Excel .xlsx (first sheet), Parquet, a `datasets` directory, plain text;
    any file may be gzipped (`export.csv.gz`)."""
    encoding: str = "utf-8"
    """Text encoding of the files, a Python codec name (utf-8, cp1252, latin-1, shift_jis…); UTF-8
    accepts a byte-order mark. A line whose bytes do not decode is quarantined, never patched."""
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text", "columns", "openai_dpo",
                    "preference", "kto"] = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    """For tables: which column holds which role, e.g. {user: instruction, assistant: response, system: sys};
    preference pairs: {user: question, chosen: good_reply, rejected: bad_reply}; unpaired (KTO):
    {user: question, assistant: reply, label: thumbs_up}."""
    conversation_column: str | None = None
    """Rows sharing this id form one multi-turn conversation (ordered by turn_column)."""
    turn_column: str | None = None
    group_column: str | None = None
    """Records sharing this id (e.g. a customer) never straddle splits."""
    label_column: str | None = None
    """Stratify the splits by this column (e.g. an intent or category)."""
    alternate_roles: bool = True
    """Require user and assistant turns to alternate."""
    pii: Literal["off", "report", "scrub"] = "report"
    """`report` counts emails, phone and card numbers; `scrub` also replaces them with [EMAIL]…"""
    pii_types: list[str] = field(default_factory=lambda: ["email", "phone", "card"])
    """Any of email, phone, card, order_id (order_id needs order_id_pattern)."""
    order_id_pattern: str | None = None
    placeholders: Literal["keep", "fill", "drop"] = "keep"
    """Templated data such as {{Order Number}}: keep as is, fill with realistic values, or drop the record."""
    near_duplicate_threshold: float | None = 0.9
    """Drop records whose estimated Jaccard similarity to an earlier one is at least this (null: off)."""
    near_duplicate_max_records: int = 200_000
    """Above this many conversations the near-duplicate and leakage checks are skipped (said in the
    report): they keep a MinHash per record in memory. Exact duplicates are always removed."""
    leakage_threshold: float = field(default=0.8, metadata={"slider": (0.5, 1.0, 0.01)})
    """Report held-out records with a train record at least this similar."""
    general_mix: float = field(default=0.0, metadata={"slider": (0.0, 1.0, 0.05)})
    """Forgetting guard: add this share of |train| of general instruction data to train (0: off)."""
    general_path: str | None = None
    """General data to mix in (any supported format); null: the base model's own answers to the
    general prompts shipped with ftkit (self-distillation)."""
    general_max_new_tokens: int = 160
    """Self-distillation: the longest answer generated, in tokens; answers not ended by then are left
    out, never cut (each prompt costs up to this many generated tokens, once: they are cached)."""
    general_temperature: float = 1.0
    """Self-distillation: the sampling temperature of the base model's answers. 1.0 samples its own
    distribution, so training on them keeps it (answers that stop early included); 0 takes its greedy
    answers, which sharpen it towards its most likely reply (demo: forgetting +12% greedy, +6% at 1.0)."""
    min_chars: int = 1
    max_chars: int | None = None
    val_fraction: float = field(default=0.1, metadata={"slider": (0.0, 0.5, 0.01)})
    test_fraction: float = field(default=0.1, metadata={"slider": (0.0, 0.5, 0.01)})
    max_records: int | None = None
    """Keep only the first N conversations after cleaning (quick experiments)."""
    demo_size: int = 1000
    """Number of exchanges the demo generator writes when `path: demo`."""


@dataclass
class ConvertConfig:
    """Stage 02: chat formatting, validation and tokenisation."""

    system_prompt: str | None = None
    """Prepended as a system message to conversations that have none (training, evaluation and
    serving alike); null: none added, the data's own system messages are kept as they are."""
    chat_template: str | None = None
    """null: the model's own; `chatml`, `llama3`, a path to a .jinja file, or a Jinja string."""
    max_seq_len: int = 512
    hosted_price_per_million_tokens: float = 25.0
    """USD per million training tokens on a hosted fine-tuning API, for the cost line in report 02
    (an example figure: set the price you are quoted)."""
    over_length: Literal["drop", "truncate", "split", "error"] = "drop"
    """Examples longer than max_seq_len are never cut silently: drop them, truncate at a turn
    boundary (later turns removed), split, or stop with an error; always counted in the report.
    `split`: a plain-text record (completion tuning: a document, a book) becomes consecutive pieces
    of max_seq_len tokens, every token kept and trained, the EOS only at the document's end; a
    conversation cannot be split without losing its context, so it is truncated as with `truncate`."""


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = field(default=0.0, metadata={"slider": (0.0, 0.5, 0.01)})
    """Dropout on the adapter's input. 0 (PEFT's, LLaMA-Factory's and Unsloth's default) lets the A
    projections that share an input run as one product and skips a copy of every layer input: faster on
    CPU and GPU (docs/gpu.md); raise it (0.05-0.1) when a small data set overfits."""
    target_modules: Any = "all-linear"
    """`all-linear` or a list of module names such as [q_proj, v_proj]."""
    rslora: bool = False
    """Rank-stabilised LoRA: scale by alpha/sqrt(r) instead of alpha/r."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full and saved with the adapter (e.g. [lm_head, embed_tokens])."""


@dataclass
class PreferenceConfig:
    """Preference tuning (``train.objective`` dpo, kto or orpo), through TRL's trainers."""

    beta: float = field(default=0.1, metadata={"slider": (0.01, 1.0, 0.01)})
    """DPO/KTO: how far the tuned model may move from the reference (higher: closer to it); ORPO: the weight
    of the odds-ratio term beside the chosen replies' language-model loss (the paper's lambda)."""
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    """DPO: TRL's loss variants, e.g. [sigmoid] (DPO), [ipo], [hinge], [robust], [sigmoid, sft] (RPO: DPO plus
    the chosen replies' language-model loss); KTO: [kto] or [apo_zero_unpaired]. Several are summed."""
    label_smoothing: float = 0.0
    """Robust DPO: the share of pairs assumed mislabelled (0 to 0.5)."""
    desirable_weight: float = 1.0
    """KTO: weight of the good replies' loss (raise it when good replies are the fewer)."""
    undesirable_weight: float = 1.0
    """KTO: weight of the bad replies' loss."""


@dataclass
class TrainConfig:
    """Stage 03: fine-tuning."""

    method: Literal["lora", "qlora", "dora", "full"] = "lora"
    """`lora`; `qlora` (4-bit NF4 base with double quantisation, bitsandbytes; CPU too); `dora`
    (weight-decomposed LoRA); `full` (every weight trained)."""
    objective: Literal["instruction", "completion", "dpo", "kto", "orpo"] = "instruction"
    """`instruction`: loss on assistant tokens only (end-of-turn included); `completion`: on every
    token (for prompt/completion data the prompt too; plain text data is all completion anyway);
    `dpo`: preference pairs (chosen over rejected, TRL's DPOTrainer); `kto`: good/bad labelled replies,
    paired or not (TRL's KTOTrainer); `orpo`: pairs, reference-free (the chosen replies' language-model loss
    plus beta x the odds-ratio loss; SFT and preference in one run). DPO and KTO compare against the
    reference model: the same weights with this run's adapter off (with `init_adapter`, a frozen copy of
    that adapter; with method full, its log-probabilities computed once before training).
    Preference data with `instruction` trains on the chosen replies (the SFT step before DPO)."""
    init_adapter: str | None = None
    """Start from an earlier run's adapter and train it on (its LoRA settings, not train.lora's); for
    DPO/KTO it is also the reference. `experiment:NAME`: that experiment's adapter under outputs_dir
    (`make run` trains NAME's stages 01-03 first); or a path to an adapter folder. null: a new adapter."""
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    num_processes: int = 1
    """>1: the notebook runs `accelerate launch` with this many processes (one per GPU)."""
    accelerate_config: str | None = None
    """`ddp`, `fsdp`, `deepspeed-zero2`, `deepspeed-zero3` (shipped templates) or a path to an
    accelerate config file; null: plain DDP."""
    learning_rate: float = field(default=2e-4, metadata={"log_slider": (-6.0, -2.0)})
    epochs: float = 1.0
    max_steps: int = -1
    """Stop after this many optimiser steps (-1: run `epochs`)."""
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = field(default=0.05, metadata={"slider": (0.0, 0.5, 0.01)})
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    weight_decay: float = field(default=0.0, metadata={"slider": (0.0, 0.3, 0.01)})
    max_grad_norm: float = 1.0
    logging_steps: int = 5
    eval_steps: int = 20
    """Evaluate on the validation split every N steps (0: only at the end)."""
    max_eval_examples: int = 64
    """Cap on validation examples used during training (the full test split is used in 04)."""
    packing: bool = True
    """Padding-free packing: a micro-batch's examples are concatenated into one row with
    per-example position ids, attention kept inside each example (verified before training)."""
    optimizer: Literal["auto", "adamw_torch", "adamw_torch_fused", "sgd", "adafactor"] = "auto"
    """`auto`: fused AdamW (`adamw_torch_fused`) on a GPU, `adamw_torch` on CPU."""
    gradient_checkpointing: bool | None = None
    """Recompute activations in the backward pass: less memory, about a third more compute.
    null: on for QLoRA on a GPU (memory is what QLoRA is for), and wherever `max_memory_gb` needs it
    (the micro-batch configured would not fit without it); otherwise off."""
    max_memory_gb: float | None = None
    """Accelerator memory this run may use, in GB (GiB): plan a run for a 24 GB card on a larger one.
    null: the device's free memory. The pre-flight check, the micro-batch fold and gradient
    checkpointing (when null) are planned for it, and on a GPU the allocator is capped at it, so a
    run that would go over stops with out-of-memory instead of using more."""
    attention: Literal["auto", "varlen", "sdpa"] = "auto"
    """`auto`: with packing, `varlen`: each example's own causal triangle, nothing across examples
    (PyTorch's variable-length flash attention on a GPU, SDPA per example on CPU); `sdpa`: the
    model's SDPA over the packed row with a block mask."""
    kernels: Literal["auto", "liger", "liger+loss", "none"] = "auto"
    """`auto`: `none` when the layers are compiled (the compiler fuses the same operations, faster
    on an H200), else `liger` on a GPU when `liger-kernel` is installed, else `none`. `liger`: Liger's
    fused RMSNorm and SwiGLU; `liger+loss`: also its fused linear + cross-entropy (no logits tensor:
    less memory, but slower on an H200); `none`: the model's own modules."""
    compile: bool | None = None
    """torch.compile each decoder layer (dynamic shapes; attention stays eager). null: on a GPU for
    LoRA, DoRA, full fine-tuning and QLoRA when the run is estimated to take 5 minutes or more
    (compiling takes ~30-60 s; measured 1.4-1.7x faster on an H200, QLoRA 1.3x at 0.7x the peak);
    off for several processes and on CPU."""
    merge_accumulation: bool | None = None
    """Fold gradient-accumulation steps into one larger packed micro-batch where the memory estimate
    allows (same examples per optimiser step, same loss normalisation: the same maths, fewer and
    larger kernels). null: on with packing on a GPU."""
    trained_logits_only: bool | None = None
    """Compute the LM head and the loss only where the next token is trained (the replies), not over
    prompts: the same loss and gradients with less work and memory (the head is 7-15% of a model's
    matrix products; prompts are a fifth of Bitext's tokens, more with system prompts or few-shot
    turns). Needs packing and a model that takes ``logits_to_keep`` as positions (transformers'
    causal LMs); null: on with packing."""
    group_by_length: bool = False
    """Batch examples of similar length together (less padding, faster)."""
    neftune_noise_alpha: float | None = None
    """NEFTune: noise on input embeddings during training (e.g. 5.0); null: off."""
    save_steps: int = 0
    """Write a checkpoint (adapter or weights, optimizer, scheduler, RNG states, data position)
    every N steps (0: none)."""
    save_total_limit: int = 2
    """Keep the newest N checkpoints."""
    resume: str = "auto"
    """`auto`: continue from the newest complete checkpoint of this experiment; `never`; or a path."""
    early_stopping_patience: int | None = None
    """Stop when val loss has not improved for this many evaluations (null: off)."""
    report_to: list[str] = field(default_factory=list)
    """Extra logging integrations passed to the Trainer, e.g. [tensorboard] (event files under checkpoints/)."""
    deterministic: bool = False
    num_threads: int | None = None
    """CPU threads for torch (null: torch's default)."""
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class RulesConfig:
    """House-style rules checked on generated replies (stage 04)."""

    max_sentences: int | None = None
    required_phrases: list[str] = field(default_factory=list)
    must_match: list[str] = field(default_factory=list)
    """Regular expressions every reply must match."""
    must_not_match: list[str] = field(default_factory=list)
    """Regular expressions no reply may match."""
    echo_pattern: str | None = None
    """Regex: when the prompt contains a match (e.g. an order number) the reply must repeat it."""
    ignore_for_sentences: list[str] = field(default_factory=list)
    """Exact phrases (e.g. a sign-off) removed before counting sentences."""


@dataclass
class PromptingConfig:
    """The "prompted" baseline of stage 04: the base model given a system prompt and few-shot examples."""

    system_prompt: str | None = None
    """Instructions for the base model; None: the training system prompt (if any)."""
    few_shot: int = 3
    """How many train conversations (seeded choice, the same for every prompt) go before each test prompt."""


@dataclass
class ForgettingConfig:
    """General-ability check: the base and tuned models on general questions with reference answers."""

    path: str | None = None
    """Your general set (any supported format with an assistant reply); None: the shipped 40 questions."""
    max_loss_increase: float = 0.10
    """Flag forgetting when the tuned model's loss on the general answers is this much (relative) above base's."""
    max_stop_rate_drop: float = 0.20
    """... or when the share of general replies that stop by themselves falls by more than this."""
    num_generations: int = 16
    max_new_tokens: int = 64


@dataclass
class JudgeConfig:
    """Optional pairwise LLM-as-judge: tuned vs base and tuned vs prompted, each pair judged in both orders."""

    enabled: bool = False
    model: str | None = None
    """A local judge: a model name ftkit knows, a local directory or a hub id (loaded with transformers)."""
    base_url: str | None = None
    """Or any OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (then `model` is its model id)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the endpoint's key (never put keys in parameters files)."""
    max_pairs: int = 16
    """Test prompts judged per comparison (each judged twice, once per order)."""


@dataclass
class EvaluateConfig:
    """Stage 04: base, prompted base and tuned model on the held-out test split."""

    batch_size: int = 8
    generation_batch_size: int = 48
    """Replies generated together (left-padded, one KV cache). A decoding step reads every weight once
    whatever the batch, so a larger batch costs little more per step: 48 demo replies on 2 CPU cores
    took 54 s in one batch against 104 s in batches of 8, the same tokens. Lower it if generation
    runs out of memory (long prompts, a large model)."""
    max_examples: int | None = None
    """Test conversations for loss and perplexity (the first N); null: as many as `time_budget_s`
    allows (streamed, so memory stays flat)."""
    time_budget_s: float | None = None
    """Seconds the three loss passes and the generations may take, estimated from stage 03's measured
    speed before they run; the loss passes read the first test rows that fit (at least 50), and the
    report says what interval width they bought. null: as long as training took, at least 60 s."""
    all_rows: bool = False
    """Read every test row in the loss passes, whatever it costs (the budget then only estimates)."""
    num_generations: int = 32
    """How many test prompts get generations from each of the three models."""
    max_new_tokens: int = 96
    do_sample: bool = False
    """Greedy by default; with sampling, `temperature` and `top_p` apply and `seed` makes it repeatable."""
    temperature: float = field(default=0.7, metadata={"slider": (0.0, 2.0, 0.05)})
    top_p: float = field(default=0.95, metadata={"slider": (0.05, 1.0, 0.01)})
    task: Literal["auto", "free_text", "label", "json"] = "auto"
    """`label`: replies are class labels (accuracy, macro F1, confusion matrix); `json`: replies are JSON
    (validity rate); `auto` decides from the references."""
    bootstrap_samples: int = 1000
    confidence: float = field(default=0.95, metadata={"slider": (0.5, 0.99, 0.01)})
    rules: RulesConfig = field(default_factory=RulesConfig)
    prompting: PromptingConfig = field(default_factory=PromptingConfig)
    forgetting: ForgettingConfig = field(default_factory=ForgettingConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)


@dataclass
class HostConfig:
    """Stage 05: merge and serve."""

    host: str = "127.0.0.1"
    port: int = 0
    """0: pick a free port."""
    api_key: str | None = field(default=None, metadata={"secret": True})
    """The key clients must send (`Authorization: Bearer KEY`); needed to bind anywhere but loopback. Set it
    in the environment (`host.api_key_env`) or in a notebook cell, never in a parameters file (refused
    there: the file is copied into every rendered notebook). Saved configs show it as `<hidden>`."""
    api_key_env: str = "FTKIT_API_KEY"
    """Environment variable holding the server's key when `host.api_key` is not set."""
    max_tokens_cap: int = 512
    max_prompt_tokens: int | None = None
    """Refuse longer prompts with a 400; None: the model's context."""
    kv_cache_tokens: int | None = None
    """KV cache pool of the continuous-batching engine, in tokens, shared by concurrent requests;
    None: 16,384 on a CPU, sized from free memory on a GPU (30%, at most 262,144 tokens)."""
    threads: int | None = None
    """CPU threads for the served model; None: one less than the cores (at least 1), leaving a core for the
    HTTP threads and the load generator; threads waiting for a busy core spin (measured 10x slower)."""
    prompts: list[str] = field(default_factory=list)
    """User messages sent to the served model for the report; empty: the first three prompts of
    the test split (your own data, never a canned question)."""
    consistency_examples: int = 8
    """Test conversations for the train/serve check (prompt tokens equal training tokens; replies stop)."""
    consistency_max_tokens: int = 128
    min_stop_rate: float = field(default=1.0, metadata={"slider": (0.0, 1.0, 0.05)})
    """Share of check replies that must end with the end-of-turn token within consistency_max_tokens."""
    gguf_types: Literal["auto"] | list[str] = "auto"
    """GGUF exports for llama.cpp and Ollama: `auto` writes q8_0 (and q4_k_m where llama.cpp's
    quantiser is built) for any architecture the converter supports, and skips the export with the
    reason in the report for one it does not; or a list of f32, f16, bf16, q8_0, q4_k_m; [] skips."""
    load_concurrency: list[int] = field(default_factory=lambda: [1, 4, 16])
    load_requests_per_client: int = 2
    load_max_tokens: int = 64
    # cost and payback
    requests_per_day: int = 10_000
    """Requests a day; self-hosting is sized on these at the requests/s the load test measured."""
    tokens_per_request: int = 600
    """Prompt + reply tokens of one request: the hosted API's price (it bills both); not used to size
    the machines (the load test measures reply tokens, of the test split's prompts)."""
    hosted_price_per_million_tokens: float = 1.5
    """A hosted API's blended price (USD per 1M tokens) for the same requests (a fine-tuned small hosted model)."""
    machine_hourly_usd: float = 0.10
    """What the machine that serves the model costs per hour (self-hosting; 0.10: a 2-4 vCPU cloud VM)."""
    fine_tune_cost_usd: float = 20.0
    """One-off cost of preparing and training the model (compute + people), paid back by cheaper serving."""


@dataclass
class ExperimentConfig:
    """Everything one experiment needs; every stage reads the section it uses."""

    experiment: str = "demo"
    seed: int = 42
    outputs_dir: str = "outputs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    host: HostConfig = field(default_factory=HostConfig)

    def to_dict(self) -> dict:
        """Every value, secrets shown as :data:`HIDDEN` (what config.json, reports and saved files hold)."""
        out = dataclasses.asdict(self)
        for dotted in SECRETS:
            section, key = dotted.split(".")
            if out[section][key] is not None:
                out[section][key] = HIDDEN
        return out


SECTIONS = tuple(f.name for f in dataclasses.fields(ExperimentConfig))


def load_config(
    params: dict | str | Path | None = None,
    *,
    overrides: dict | None = None,
    source: str | None = None,
    **sections: Any,
) -> ExperimentConfig:
    """Build a validated :class:`ExperimentConfig`.

    Args:
        params: a mapping of top-level keys, or the path of a parameters YAML file.
        overrides: dotted keys applied last, e.g. ``{"train.max_steps": 10}``.
        source: a name for the origin of the values, used in error messages.
        **sections: top-level keys given directly (what a notebook's parameters cell holds).
            ``None`` or ``{}`` for a section means "defaults".

    Raises:
        ConfigError: listing every unknown key, wrong type and invalid value at once.
    """
    if isinstance(params, (str, Path)):
        source = source or str(params)
        params = read_yaml(params)
    merged: dict = copy.deepcopy(params or {})
    for key, value in sections.items():
        if value is None or (isinstance(value, dict) and not value):
            continue
        if isinstance(merged.get(key), dict) and isinstance(value, dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    overrides = {**(merged.pop("overrides", None) or {}), **(overrides or {})}

    errors: list[str] = []
    for dotted, value in overrides.items():
        _set_dotted(merged, dotted, value, errors)
    for dotted in SECRETS:  # a saved config's placeholder is no key (the real one is never written)
        section, key = dotted.split(".")
        if isinstance(merged.get(section), dict) and merged[section].get(key) == HIDDEN:
            merged[section] = {**merged[section], key: None}
    cfg = _build(ExperimentConfig, merged, "", errors)
    errors.extend(_check_values(cfg))
    if errors:
        raise ConfigError(errors, source)
    return cfg


def read_yaml(path: str | Path) -> dict:
    """Read a parameters file; a syntax error names the file and line, and so does a secret written in it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
        data = yaml.safe_load(text)
    except FileNotFoundError:
        raise ConfigError([f"parameters file not found: {path}"]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError([f"{where}: invalid YAML ({getattr(e, 'problem', e)})"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping of sections at the top, got {type(data).__name__}"])
    secrets = _secrets_in(data)
    if secrets:
        raise ConfigError([f"{path}:{_line_of(text, d.split('.')[-1])}: {d}: a key in a parameters file is copied "
                           f"into every rendered notebook and into version control; remove it and set it in the environment "
                           f"instead: {_secret_env(d)}" for d in secrets])
    return data


SECRETS = ("host.api_key",)
"""Dotted keys whose values are never written anywhere (fields with ``metadata={"secret": True}``)."""
HIDDEN = "<hidden>"
"""What a secret's value reads as in every saved config; read back, it is no value (None)."""


def _secret_env(dotted: str) -> str:
    return {"host.api_key": "export FTKIT_API_KEY=... (or name another variable in host.api_key_env)"}[dotted]


def _secrets_in(data: dict) -> list[str]:
    found = []
    overrides = data.get("overrides") if isinstance(data.get("overrides"), dict) else {}
    for dotted in SECRETS:
        section, key = dotted.split(".")
        block = data.get(section)
        values = [block.get(key) if isinstance(block, dict) else None, overrides.get(dotted)]
        if any(v not in (None, "", HIDDEN) for v in values):
            found.append(dotted)
    return found


def _line_of(text: str, key: str) -> int:
    import re

    for n, line in enumerate(text.splitlines(), 1):
        if re.match(rf"\s*(['\"]?)(host\.)?{re.escape(key)}\1\s*:", line):
            return n
    return 1


def check_top_level(params: dict, source: str) -> None:
    """Reject unknown top-level keys of a parameters file (papermill would only warn)."""
    allowed = set(SECTIONS) | {"overrides"}
    errors = [_unknown(k, allowed, "") for k in params if k not in allowed]
    if errors:
        raise ConfigError(errors, source)


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(out.get(k), dict) and isinstance(v, dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _set_dotted(tree: dict, dotted: str, value: Any, errors: list[str]) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            errors.append(f"overrides.{dotted}: '{part}' is a value, not a section")
            return
        node = child
    node[parts[-1]] = value


def _unknown(key: str, allowed: set[str], prefix: str) -> str:
    close = difflib.get_close_matches(str(key), sorted(allowed), n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"{prefix}{key}: unknown key; {hint}valid keys are: {', '.join(sorted(allowed))}"


def _build(cls: type, values: Any, prefix: str, errors: list[str]) -> Any:
    """Instantiate dataclass ``cls`` from ``values``, collecting errors instead of raising."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        errors.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            errors.append(_unknown(key, set(fields), prefix))
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{prefix}{key}.", errors)
            continue
        value = _coerce_float_string(value, hint)
        problem = _type_problem(value, hint)
        if problem:
            errors.append(f"{prefix}{key}: {problem}")
            continue
        kwargs[key] = float(value) if hint is float and isinstance(value, int) else value
    return cls(**kwargs)


def _coerce_float_string(value: Any, hint: Any) -> Any:
    """YAML 1.1 reads `1e-4` (no dot) as a string; accept it where a number is expected."""
    wants_float = hint is float or (typing.get_origin(hint) in (typing.Union, types.UnionType)
                                    and float in typing.get_args(hint))
    if wants_float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _type_problem(value: Any, hint: Any) -> str | None:
    """Return why ``value`` does not fit the type ``hint``, or None when it does."""
    if hint is Any:
        return None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        problems = [_type_problem(value, a) for a in args if a is not type(None)]
        return None if any(p is None for p in problems) else problems[0]
    if origin is Literal:
        if value in args:
            return None
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint_txt = f" (did you mean '{close[0]}'?)" if close else ""
        return f"invalid value {value!r}{hint_txt}; choose one of: {', '.join(map(str, args))}"
    if origin is list:
        if not isinstance(value, list):
            return f"expected a list, got {value!r}"
        for item in value:
            p = _type_problem(item, args[0]) if args else None
            if p:
                return f"list item {item!r}: {p}"
        return None
    if origin is dict:
        return None if isinstance(value, dict) else f"expected a mapping, got {value!r}"
    if hint is bool:
        return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"expected an integer, got {value!r}"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"expected a number, got {value!r}"
    if hint is str:
        return None if isinstance(value, str) else f"expected a string, got {value!r}"
    return None


PREFERENCE_OBJECTIVES = ("dpo", "kto", "orpo")
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
              "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
KTO_LOSSES = ("kto", "apo_zero_unpaired")


def _preference_checks(t: TrainConfig) -> list[str]:
    p, errors = t.preference, []
    if p.beta <= 0:
        errors.append(f"train.preference.beta: must be positive, got {p.beta}")
    if not 0 <= p.label_smoothing < 0.5:
        errors.append(f"train.preference.label_smoothing: a share in [0, 0.5), got {p.label_smoothing}")
    if t.objective == "orpo" and p.loss_type != ["sigmoid"]:
        errors.append(f"train.preference.loss_type: {p.loss_type!r} does not apply to ORPO (its loss is fixed); "
                      "leave it out, or use objective dpo for DPO's loss variants")
    if t.objective in ("dpo", "kto"):
        known = DPO_LOSSES if t.objective == "dpo" else KTO_LOSSES
        if t.objective == "kto" and p.loss_type == ["sigmoid"]:
            pass  # the DPO default: KTO reads it as kto (kto_loss)
        elif not p.loss_type or any(x not in known for x in p.loss_type):
            errors.append(f"train.preference.loss_type: {p.loss_type!r} is not a {t.objective.upper()} loss; use "
                          f"some of {', '.join(known)}")
    return errors


def _check_values(cfg: ExperimentConfig) -> list[str]:
    """Checks across fields, beyond types."""
    errors = []
    d = cfg.data
    if not 0 <= d.val_fraction < 1 or not 0 <= d.test_fraction < 1 or d.val_fraction + d.test_fraction >= 1:
        errors.append(
            f"data.val_fraction={d.val_fraction}, data.test_fraction={d.test_fraction}: each must be in "
            "[0, 1) and together below 1"
        )
    roles = set(d.columns)
    if d.format == "columns" and not ({"user", "assistant"} <= roles or {"user", "chosen", "rejected"} <= roles):
        errors.append("data.columns: with data.format 'columns', map at least user and assistant, "
                      "e.g. {user: instruction, assistant: response} (preference pairs: user, chosen and rejected; "
                      "unpaired preferences: user, assistant and label)")
    bad_roles = roles - {"system", "user", "assistant", "chosen", "rejected", "label"}
    if bad_roles:
        errors.append(f"data.columns: unknown role(s) {', '.join(sorted(bad_roles))}; use system, user, assistant "
                      "(preference data: chosen, rejected; or label)")
    bad_pii = set(d.pii_types) - {"email", "phone", "card", "order_id"}
    if bad_pii:
        errors.append(f"data.pii_types: unknown type(s) {', '.join(sorted(bad_pii))}; use email, phone, card, order_id")
    if "order_id" in d.pii_types and not d.order_id_pattern:
        errors.append("data.pii_types: 'order_id' needs data.order_id_pattern (a regex such as 'AC-\\d{6}')")
    if not 0 <= d.general_mix <= 1:
        errors.append(f"data.general_mix: a share of the training split in [0, 1], got {d.general_mix}")
    if d.general_temperature < 0:
        errors.append(f"data.general_temperature: 0 (greedy) or a positive temperature, got {d.general_temperature}")
    if d.general_max_new_tokens < 1:
        errors.append(f"data.general_max_new_tokens: a number of tokens, at least 1, got {d.general_max_new_tokens}")
    if d.near_duplicate_threshold is not None and not 0 < d.near_duplicate_threshold <= 1:
        errors.append(f"data.near_duplicate_threshold: must be in (0, 1] or null, got {d.near_duplicate_threshold}")
    if not isinstance(d.path, str) and not (isinstance(d.path, list) and d.path and all(isinstance(p, str) for p in d.path)):
        errors.append(f"data.path: a path or a list of paths, got {d.path!r}")
    from ftkit.core.readers import encoding_problem  # codecs.lookup, and the readers' need: ASCII bytes mean ASCII

    if problem := encoding_problem(d.encoding):
        errors.append(f"data.encoding: {problem}")
    t = cfg.train
    for name in ("batch_size", "gradient_accumulation_steps", "logging_steps"):
        if getattr(t, name) < 1:
            errors.append(f"train.{name}: must be at least 1, got {getattr(t, name)}")
    if t.learning_rate <= 0:
        errors.append(f"train.learning_rate: must be positive, got {t.learning_rate}")
    if t.max_memory_gb is not None and t.max_memory_gb <= 0:
        errors.append(f"train.max_memory_gb: must be positive (GB), got {t.max_memory_gb}; or null for the free memory")
    if t.max_steps == 0 or t.max_steps < -1:
        errors.append(f"train.max_steps: use -1 (run train.epochs) or a positive number, got {t.max_steps}")
    if t.lora.r < 1:
        errors.append(f"train.lora.r: must be at least 1, got {t.lora.r}")
    if t.compile and t.kernels in ("liger", "liger+loss"):
        errors.append(f"train.kernels: {t.kernels!r} cannot run inside compiled layers (Liger's kernels fail to "
                      "trace); set train.kernels: none (the compiler fuses the same operations) or train.compile: false")
    tm = t.lora.target_modules
    if not (tm == "all-linear" or (isinstance(tm, list) and tm and all(isinstance(x, str) for x in tm))):
        errors.append(f"train.lora.target_modules: use 'all-linear' or a list of module names, got {tm!r}")
    errors += _preference_checks(t)
    if cfg.convert.max_seq_len < 16:
        errors.append(f"convert.max_seq_len: must be at least 16, got {cfg.convert.max_seq_len}")
    e = cfg.evaluate
    for name in ("batch_size", "generation_batch_size", "num_generations", "max_new_tokens", "bootstrap_samples"):
        if getattr(e, name) < 1:
            errors.append(f"evaluate.{name}: must be at least 1, got {getattr(e, name)}")
    if e.time_budget_s is not None and e.time_budget_s <= 0:
        errors.append(f"evaluate.time_budget_s: seconds above 0 (null: as long as training took), got {e.time_budget_s}")
    if e.max_examples is not None and e.max_examples < 1:
        errors.append(f"evaluate.max_examples: at least 1 test row (null: what the time budget allows), got {e.max_examples}")
    if not 0.5 <= e.confidence < 1:
        errors.append(f"evaluate.confidence: a level such as 0.95 (in [0.5, 1)), got {e.confidence}")
    if e.prompting.few_shot < 0:
        errors.append(f"evaluate.prompting.few_shot: 0 or more train examples, got {e.prompting.few_shot}")
    if e.judge.enabled and not (e.judge.model or e.judge.base_url):
        errors.append("evaluate.judge: enabled without a judge; set evaluate.judge.model (a local model) or "
                      "evaluate.judge.base_url and evaluate.judge.model (an OpenAI-compatible endpoint)")
    h = cfg.host
    for name in ("max_tokens_cap", "kv_cache_tokens", "consistency_examples", "consistency_max_tokens",
                 "load_requests_per_client", "load_max_tokens", "requests_per_day", "tokens_per_request"):
        if getattr(h, name) is not None and getattr(h, name) < 1:
            errors.append(f"host.{name}: must be at least 1, got {getattr(h, name)}")
    if not 0 <= h.min_stop_rate <= 1:
        errors.append(f"host.min_stop_rate: a share in [0, 1], got {h.min_stop_rate}")
    if h.gguf_types != "auto" and (bad := [t for t in h.gguf_types if t not in GGUF_TYPES]):
        errors.append(f"host.gguf_types: 'auto' or a list of {', '.join(GGUF_TYPES)}; got {bad}")
    if not h.load_concurrency or min(h.load_concurrency) < 1:
        errors.append(f"host.load_concurrency: a list of client counts >= 1, e.g. [1, 4, 16]; got {h.load_concurrency}")
    if min(h.hosted_price_per_million_tokens, h.machine_hourly_usd, h.fine_tune_cost_usd) < 0:
        errors.append("host: prices (hosted_price_per_million_tokens, machine_hourly_usd, fine_tune_cost_usd) "
                      "must not be negative")
    if not cfg.experiment or "/" in cfg.experiment:
        errors.append(f"experiment: must be a non-empty name without '/', got {cfg.experiment!r}")
    return errors


def init_adapter_path(cfg: ExperimentConfig) -> str | None:
    """``train.init_adapter`` as a folder: ``experiment:NAME`` is ``<outputs_dir>/NAME/adapter``."""
    value = cfg.train.init_adapter
    if value and value.startswith("experiment:"):
        from pathlib import Path

        return str(Path(cfg.outputs_dir) / value.split(":", 1)[1] / "adapter")
    return value


def kto_loss(p: PreferenceConfig) -> str:
    """KTO's loss: the first one named, or ``kto`` for the default (DPO's ``[sigmoid]``)."""
    return p.loss_type[0] if p.loss_type and p.loss_type[0] in KTO_LOSSES else "kto"
