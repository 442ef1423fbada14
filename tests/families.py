"""Tiny random models of each major open chat-model family, built locally for the tests.

Each family gets its real architecture (transformers' config class, a few hundred thousand
weights), a tokenizer trained here with the ``tokenizers`` library in the family's style (byte-level
BPE for Llama 3 and Qwen, SentencePiece-style metaspace BPE for Mistral, Gemma and Phi) that holds
the family's special tokens, and the family's own chat template from llama.cpp's collection of
the model authors' templates (fetched by ``make thirdparty``). Nothing is downloaded from a hub.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Family:
    name: str
    config: str  # transformers config class
    template: str  # file in llama.cpp's models/templates/
    style: str  # "bytelevel" or "metaspace"
    bos: str
    eos: str
    pad: str
    specials: tuple[str, ...]
    end_of_turn: str  # what the template closes an assistant turn with
    plain: tuple[str, ...] = ()  # added tokens that are not special (kept in decoded text), e.g. <think>


FAMILIES = [
    Family("llama3", "LlamaConfig", "meta-llama-Llama-3.1-8B-Instruct.jinja", "bytelevel", "<|begin_of_text|>",
           "<|end_of_text|>", "<|finetune_right_pad_id|>",
           ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"), "<|eot_id|>"),
    Family("qwen2.5", "Qwen2Config", "Qwen-Qwen2.5-7B-Instruct.jinja", "bytelevel", "<|endoftext|>", "<|im_end|>",
           "<|endoftext|>", ("<|im_start|>", "<|im_end|>"), "<|im_end|>"),
    Family("qwen3", "Qwen3Config", "Qwen-Qwen3-0.6B.jinja", "bytelevel", "<|endoftext|>", "<|im_end|>",
           "<|endoftext|>", ("<|im_start|>", "<|im_end|>"), "<|im_end|>", ("<think>", "</think>")),
    Family("mistral", "MistralConfig", "mistralai-Mistral-Nemo-Instruct-2407.jinja", "metaspace", "<s>", "</s>",
           "<pad>", ("[INST]", "[/INST]", "<unk>"), "</s>"),
    Family("gemma", "Gemma3TextConfig", "google-gemma-2-2b-it.jinja", "metaspace", "<bos>", "<eos>", "<pad>",
           ("<start_of_turn>", "<end_of_turn>", "<unk>"), "<end_of_turn>"),
    Family("phi3", "Phi3Config", "microsoft-Phi-3.5-mini-instruct.jinja", "metaspace", "<s>", "<|endoftext|>",
           "<pad>", ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<unk>"), "<|end|>"),
    Family("smollm3", "SmolLM3Config", "HuggingFaceTB-SmolLM3-3B.jinja", "bytelevel", "<|im_start|>", "<|im_end|>",
           "<|endoftext|>", ("<|im_start|>", "<|im_end|>", "<|endoftext|>"), "<|im_end|>", ("<think>", "</think>")),
]
BY_NAME = {f.name: f for f in FAMILIES}


def template_path(name: str) -> Path:
    from ftkit.host import llama_cpp

    return llama_cpp.home() / "models" / "templates" / name


def build_tokenizer(fam: Family, corpus: list[str], vocab_size: int = 700):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys([fam.bos, fam.eos, fam.pad, *fam.specials]))
    if fam.style == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = sorted({ch for text in corpus for ch in text.replace(" ", "▁")})
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    kw = {"unk_token": "<unk>"} if "<unk>" in specials else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=fam.bos, eos_token=fam.eos, pad_token=fam.pad,
                                   additional_special_tokens=[s for s in fam.specials if s not in (fam.bos, fam.eos)],
                                   **kw)
    fast.add_tokens(list(fam.plain))
    fast.chat_template = template_path(fam.template).read_text(encoding="utf-8")
    return fast


def build_model_dir(fam: Family, out: Path, corpus: list[str]) -> Path:
    """A tiny random model of ``fam`` with its tokenizer and template, saved under ``out``."""
    from ftkit.core.modeling import prepare_tokenizer

    if (out / "config.json").exists():
        return out
    tok = build_tokenizer(fam, corpus)
    prepare_tokenizer(tok)
    save_tiny(fam.config, tok, out)
    return out


def save_tiny(config_class: str, tok, out: Path, **overrides) -> Path:
    """A 2-layer random model of ``config_class`` (a transformers config name) sized for ``tok``, with
    ftkit's generation config (stop ids), saved with the tokenizer under ``out``."""
    import torch
    import transformers

    from ftkit.core.modeling import set_generation_config

    kw = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if config_class == "Qwen3Config":
        kw["head_dim"] = 16
    if config_class == "Gemma3TextConfig":
        # As the released Gemma 3 checkpoints are, and as llama.cpp and transformers' GGUF reader assume (the
        # file records neither): head_dim 256 = query_pre_attn_scalar, and only every sixth layer global, so
        # both of these two layers are local.
        kw.update(head_dim=256, sliding_window=256, layer_types=["sliding_attention"] * 2)
    kw.update(overrides)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**kw))
    set_generation_config(model, tok)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
