"""GGUF export for llama.cpp and Ollama (Llama-architecture models), written with the ``gguf`` package.

Our own converter, for ``LlamaForCausalLM`` without rope scaling or biases and with a plain GPT-2-style
byte-level BPE tokenizer (the SmolLM2 family; Llama 2/TinyLlama's SentencePiece and Llama 3's split
pre-tokenizer are refused): hyper-parameters and the tokenizer (tokens, types, merges,
special ids, chat template) go into GGUF metadata; weights are renamed to GGUF's tensor names, with
the query/key rows reordered from Hugging Face's rotary layout (first half / second half of each head)
to GGML's (interleaved pairs). Norms stay float32; matrices are float16 or Q8_0 (blocks of 32 weights
with one float16 scale). Anything outside that family is refused with a message, not exported wrongly.

:func:`verify` loads a written file back with transformers' GGUF loader (``gguf_file=``), which
de-quantises it, and compares logits with the merged model's on real prompts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("ftkit")

# Round-trip tolerances: (max |Δlogit| relative to the merged model's largest |logit|, least share of
# positions with the same greedy next token, largest mean KL divergence merged → GGUF per position).
# float16 keeps 11 significant bits per weight; Q8_0 8 bits per block of 32 weights with a shared scale.
# Near-ties can flip the greedy token for either, so agreement is bounded loosely and the KL divergence
# (llama.cpp's measure of quantisation loss) carries the distribution-level check. Measured on the demo's
# merged SmolLM2-135M: f16 0.19% / 98.3% / <1e-4, q8_0 3.1% / 98.3% / 0.003 (README, "Exports").
TOLERANCE = {"f32": (1e-5, 1.0, 1e-6), "f16": (1e-2, 0.95, 1e-3), "q8_0": (5e-2, 0.95, 1e-2)}

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


class GGUFExportError(ValueError):
    """The model is outside what this converter writes correctly."""


def _check_supported(config, tokenizer_json: dict) -> None:
    problems = []
    if config.model_type != "llama":
        problems.append(f"model_type is {config.model_type!r}, this converter writes 'llama' only")
    if getattr(config, "rope_scaling", None) and (config.rope_scaling or {}).get("rope_type", "default") != "default":
        problems.append(f"rope_scaling {config.rope_scaling} needs GGUF rope-scaling tensors this converter does not write")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("attention/MLP biases are not written by this converter")
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE" or (tokenizer_json.get("pre_tokenizer") or {}).get("type") != "ByteLevel":
        problems.append("the tokenizer is not a plain byte-level BPE (GPT-2 style) tokenizer")
    if problems:
        raise GGUFExportError("cannot export to GGUF: " + "; ".join(problems)
                              + ". Use llama.cpp's convert_hf_to_gguf.py on the merged directory for this model, "
                              "and set host.gguf_types: [] so stage 05 skips ftkit's export.")


def _to_ggml_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k rows per head from HF's rotate-half layout to GGML's interleaved pairs."""
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model, config):
    """(gguf name, float32 array) for every weight, in GGUF's naming and layout."""
    sd = {k: v.detach().to(torch.float32).cpu().numpy() for k, v in model.state_dict().items()}
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    yield "token_embd.weight", sd["model.embed_tokens.weight"]
    for i in range(config.num_hidden_layers):
        for hf, gg in _LAYER_NAMES.items():
            w = sd[f"model.layers.{i}.{hf}"]
            if hf.startswith("self_attn.q_proj"):
                w = _to_ggml_rotary(w, n_head)
            elif hf.startswith("self_attn.k_proj"):
                w = _to_ggml_rotary(w, n_kv)
            yield f"blk.{i}.{gg}", w
    yield "output_norm.weight", sd["model.norm.weight"]
    if not config.tie_word_embeddings:
        yield "output.weight", sd["lm_head.weight"]


def _tokenizer_metadata(writer, tokenizer, tokenizer_json: dict) -> None:
    import gguf

    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for i, added in tokenizer.added_tokens_decoder.items():
        types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    merges = tokenizer_json["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm" if "<|im_start|>" in vocab and size == 49152 else "gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for setter, tid in ((writer.add_bos_token_id, tokenizer.bos_token_id), (writer.add_eos_token_id, tokenizer.eos_token_id),
                        (writer.add_unk_token_id, tokenizer.unk_token_id), (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if tid is not None:
            setter(tid)
    from .masking import end_of_turn_token_id

    writer.add_eot_token_id(end_of_turn_token_id(tokenizer))
    writer.add_add_bos_token(False)  # the chat template writes every special token itself
    writer.add_chat_template(tokenizer.chat_template)


def write_gguf(model_dir: str | Path, out: str | Path, qtype: str = "f16") -> dict:
    """Write ``model_dir`` (a merged Hugging Face Llama-family model) as one GGUF file.

    Args:
        model_dir: a directory with config, safetensors and tokenizer (stage 05's ``merged/``).
        out: the ``.gguf`` file to write (replaced atomically).
        qtype: ``f16``, ``q8_0`` or ``f32`` for the matrices (norms are always float32).

    Returns:
        path, size in bytes and the type of each kind of tensor.
    """
    import gguf
    from transformers import AutoModelForCausalLM

    from .modeling import load_tokenizer

    if qtype not in TOLERANCE:
        raise ValueError(f"qtype must be one of {', '.join(TOLERANCE)}, got {qtype!r}")
    model_dir, out = Path(model_dir), Path(out)
    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = model.config
    _check_supported(config, tokenizer_json)
    tokenizer = load_tokenizer(str(model_dir))
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer narrates every file at INFO
    writer = gguf.GGUFWriter(tmp, "llama")
    writer.add_name(model_dir.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(float((getattr(config, "rope_parameters", None) or {}).get("rope_theta")
                                    or getattr(config, "rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    _tokenizer_metadata(writer, tokenizer, tokenizer_json)
    kinds: dict[str, str] = {}
    for name, w in _tensors(model, config):
        if w.ndim == 1 or qtype == "f32":
            data, raw = w.astype(np.float32), gguf.GGMLQuantizationType.F32
        elif qtype == "q8_0" and w.shape[-1] % 32 == 0:
            data, raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
        else:  # f16, or a row length Q8_0 cannot block
            data, raw = w.astype(np.float16), gguf.GGMLQuantizationType.F16
        writer.add_tensor(name, data, raw_dtype=raw)
        kinds[name.split(".")[2] if name.startswith("blk.") else name.split(".")[0]] = raw.name
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)
    return {"path": str(out), "type": qtype, "bytes": out.stat().st_size, "tensor_types": kinds}


@torch.no_grad()
def verify(model_dir: str | Path, gguf_file: str | Path, prompts: list[list[dict]], qtype: str) -> dict:
    """Load the GGUF back with transformers (``gguf_file=``) and compare logits with the merged model's.

    Also checks that the GGUF's own tokenizer encodes the prompts to the same ids and carries the same
    chat template. Passing means: max |Δlogit| / max |logit|, the share of positions with the same
    greedy next token and the mean KL divergence per position all within :data:`TOLERANCE`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .masking import encode_prompt, render
    from .modeling import load_tokenizer

    gguf_file = Path(gguf_file)
    tok = load_tokenizer(str(model_dir))
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    back = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32).eval()
    gtok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    diff = scale = kl = 0.0
    agree, total, same_ids = 0, 0, True
    for p in prompts:
        ids = encode_prompt(tok, p)
        same_ids &= gtok(render(tok, p, add_generation_prompt=True), add_special_tokens=False)["input_ids"] == ids
        x = torch.tensor([ids])
        a, b = ref(input_ids=x).logits[0], back(input_ids=x).logits[0]
        diff = max(diff, (a - b).abs().max().item())
        scale = max(scale, a.abs().max().item())
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        la, lb = a.log_softmax(-1), b.log_softmax(-1)
        kl += (la.exp() * (la - lb)).sum(-1).sum().item()
        total += len(ids)
    rel, top1 = diff / scale, agree / total
    max_rel, min_top1, max_kl = TOLERANCE[qtype]
    template_ok = gtok.chat_template == tok.chat_template
    return {"type": qtype, "positions": total, "max_abs_logit_diff": diff, "relative_logit_diff": rel,
            "relative_tolerance": max_rel, "top1_agreement": top1, "min_top1_agreement": min_top1,
            "mean_kl_divergence": kl / total, "max_mean_kl_divergence": max_kl, "tokenizer_matches": same_ids,
            "chat_template_matches": template_ok,
            "passed": rel <= max_rel and top1 >= min_top1 and kl / total <= max_kl and same_ids and template_ok}


def export_all(merged_dir: str | Path, paths, qtypes: list[str], prompts: list[list[dict]],
               system_prompt: str | None = None) -> dict:
    """Each GGUF type written and verified, plus the Ollama Modelfile (for the smallest verified file)."""
    from .modeling import load_tokenizer

    results = []
    for q in qtypes:
        written = write_gguf(merged_dir, paths.gguf(q), q)
        log.info("wrote %s (%s MB); verifying against %s", written["path"], f"{written['bytes'] / 1e6:,.0f}", merged_dir)
        results.append({**written, **verify(merged_dir, written["path"], prompts, q)})
    out = {"gguf": results, "gguf_passed": all(r["passed"] for r in results) if results else None}
    if not results:
        out["gguf_note"] = "no GGUF export: host.gguf_types is empty"
    if results:
        smallest = min(results, key=lambda r: r["bytes"])
        try:
            text = modelfile(load_tokenizer(str(merged_dir)), Path(smallest["path"]).name, system_prompt)
        except GGUFExportError as e:
            out["modelfile_note"] = str(e)
        else:
            from .paths import atomic_write_text

            atomic_write_text(paths.modelfile, text)
            out["modelfile"] = str(paths.modelfile)
    return out


def _chatml_default_system(tokenizer) -> str:
    """The system block a ChatML template inserts when a conversation has none ('' if it inserts none).

    Raises GGUFExportError when the template is not ChatML, checked by rendering probe conversations.
    """
    from .masking import render

    def chatml(msgs):
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs) + "<|im_start|>assistant\n"

    probe_user = [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
                  {"role": "user", "content": "u2"}]
    probe_sys = [{"role": "system", "content": "s"}, *probe_user]
    with_sys = render(tokenizer, probe_sys, add_generation_prompt=True)
    without = render(tokenizer, probe_user, add_generation_prompt=True)
    if with_sys != chatml(probe_sys) or not without.endswith(chatml(probe_user)):
        raise GGUFExportError("the chat template is not ChatML (<|im_start|>role ... <|im_end|>), so no Ollama "
                              "TEMPLATE is written for it: write the Go template by hand and check it renders "
                              f"like the Jinja one. Rendered probe: {with_sys[:200]!r}")
    return without[: len(without) - len(chatml(probe_user))]


def modelfile(tokenizer, gguf_name: str, system_prompt: str | None = None) -> str:
    """An Ollama Modelfile: the GGUF, the chat template in Ollama's Go-template form, the stop tokens.

    The Go template reproduces the ChatML structure that :func:`_chatml_default_system` verified the
    Jinja template renders (including a default system block the template inserts when a conversation
    has none); ``system_prompt`` (the training one) becomes Ollama's default ``SYSTEM``.
    """
    from .modeling import stop_token_ids

    default_system = _chatml_default_system(tokenizer)
    template = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    if default_system:
        template = ('{{- if or (not .Messages) (ne (index .Messages 0).Role "system") }}'
                    + default_system + "{{ end }}\n" + template)
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    if system_prompt:
        lines.append(f'SYSTEM """{system_prompt}"""')
    lines += [f'PARAMETER stop "{tokenizer.convert_ids_to_tokens(t)}"' for t in stop_token_ids(tokenizer)]
    return "\n".join(lines) + "\n"
