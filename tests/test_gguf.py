"""GGUF export: our Llama converter, read back by transformers' GGUF loader, matches the merged logits."""

import numpy as np
import pytest

from ftkit import gguf_export
from ftkit.gguf_export import GGUFExportError

PROMPTS = [[{"role": "user", "content": "Where is my order AC-123456?"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reset my password, it's urgent!"}]]


def test_rotary_reorder_is_what_the_gguf_loader_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.arange(8 * 64 * 3, dtype=np.float32).reshape(8 * 64, 3)  # 8 heads of 64 rows
    ours = gguf_export._to_ggml_rotary(w, 8)
    assert not np.array_equal(ours, w)
    assert np.array_equal(LlamaTensorProcessor()._reverse_permute_weights(ours, 8, 8), w)
    # row 1 of a head (first half) goes next to row 32 (its rotary partner in HF's rotate-half layout)
    assert ours[0, 0] == w[0, 0] and ours[1, 0] == w[32, 0] and ours[2, 0] == w[1, 0]


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_round_trip_tiny(tiny_path, tmp_path, qtype):
    out = gguf_export.write_gguf(tiny_path, tmp_path / f"tiny-{qtype}.gguf", qtype)
    assert out["tensor_types"]["attn_q"] == qtype.upper() and out["tensor_types"]["attn_norm"] == "F32"
    check = gguf_export.verify(tiny_path, out["path"], PROMPTS, qtype)
    assert check["tokenizer_matches"] and check["chat_template_matches"]
    assert check["relative_logit_diff"] <= gguf_export.TOLERANCE[qtype][0], check
    assert check["mean_kl_divergence"] <= gguf_export.TOLERANCE[qtype][2], check
    assert check["passed"], check


def test_refuses_what_it_cannot_write(tiny_path):
    from transformers import AutoConfig

    config = AutoConfig.for_model("qwen2")
    with pytest.raises(GGUFExportError, match="model_type is 'qwen2'.*convert_hf_to_gguf"):
        gguf_export._check_supported(config, {"model": {"type": "BPE"}, "pre_tokenizer": {"type": "ByteLevel"}})


def test_modelfile_carries_template_and_stops(tokenizer):
    text = gguf_export.modelfile(tokenizer, "demo-q8_0.gguf", "You are AcmeCorp support.")
    assert text == (
        'FROM ./demo-q8_0.gguf\n'
        'TEMPLATE """{{- if or (not .Messages) (ne (index .Messages 0).Role "system") }}<|im_start|>system\n'
        'You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n'
        '{{ end }}\n'
        '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"""\n'
        'SYSTEM """You are AcmeCorp support."""\n'
        'PARAMETER stop "<|im_end|>"\n')


def test_modelfile_refuses_a_template_it_cannot_translate(tiny_path):
    from ftkit.modeling import load_tokenizer
    from ftkit.templates import resolve_template

    tok = load_tokenizer(tiny_path, chat_template=resolve_template("llama3"))
    with pytest.raises(GGUFExportError, match="not ChatML"):
        gguf_export.modelfile(tok, "x.gguf")


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_round_trip_smollm2(smollm_path, tmp_path, qtype):
    out = gguf_export.write_gguf(smollm_path, tmp_path / f"smollm2-{qtype}.gguf", qtype)
    check = gguf_export.verify(smollm_path, out["path"], PROMPTS, qtype)
    assert check["passed"], check
