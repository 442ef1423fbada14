"""GGUF export: llama.cpp's converter writes it, transformers' reader (and llama.cpp, where built) reads it
back with the merged model's logits; refusals are reasons, not crashes; the Modelfile's Go template is
derived from the Jinja one and checked."""

import pytest

from ftkit.host import gguf as gguf_export
from ftkit.host import llama_cpp
from ftkit.host.gguf import GGUFExportError

PROMPTS = [[{"role": "user", "content": "Where is my order 123456?"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reset my password, it's urgent!"}]]

needs_converter = pytest.mark.skipif(not llama_cpp.available(), reason="llama.cpp's converter not fetched: make thirdparty")


@needs_converter
@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_round_trip_tiny(tiny_path, tmp_path, qtype):
    from pathlib import Path

    out = gguf_export.write_gguf(tiny_path, tmp_path / f"tiny-{qtype}.gguf", qtype)
    assert out["bytes"] > 0 and not list(tmp_path.glob(".*.tmp"))
    tok, texts, ids, logits, _ = gguf_export._merged_logits(tiny_path, PROMPTS)
    check = gguf_export.verify_transformers(tok, texts, ids, logits, Path(out["path"]), qtype)
    assert check["checked"] and check["tokenizer_matches"] and check["chat_template_matches"]
    assert check["relative_logit_diff"] <= gguf_export.TOLERANCE[qtype][0], check
    assert check["mean_kl_divergence"] <= gguf_export.TOLERANCE[qtype][2], check
    assert check["passed"], check


@needs_converter
def test_unsupported_architecture_is_a_reason(tmp_path, tiny_path):
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_path)
    OPTForCausalLM(OPTConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                             num_attention_heads=2, word_embed_proj_dim=32)).save_pretrained(tmp_path / "opt")
    tok.save_pretrained(tmp_path / "opt")
    with pytest.raises(GGUFExportError, match="OPTForCausalLM is not supported"):
        gguf_export.write_gguf(tmp_path / "opt", tmp_path / "opt.gguf", "q8_0")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp"))


def test_missing_tools_skip_with_the_command(tiny_path, tmp_path, monkeypatch):
    """Without llama.cpp's tools, auto skips (the stage goes on) and names the command to run."""
    from ftkit.core.paths import RunPaths

    monkeypatch.setenv("FTKIT_LLAMA_CPP", str(tmp_path / "none"))
    monkeypatch.setattr(llama_cpp, "bindings", lambda: None)
    out = gguf_export.export_all(tiny_path, RunPaths(tmp_path, "x"), "auto", PROMPTS)
    assert out["gguf"] == [] and out["gguf_passed"] is None
    assert out["gguf_skipped"][0]["type"] == "q8_0" and llama_cpp.FETCH_HINT in out["gguf_skipped"][0]["reason"]
    explicit = gguf_export.export_all(tiny_path, RunPaths(tmp_path, "x"), ["f16"], PROMPTS)
    assert explicit["gguf_passed"] is False  # asked for and not written: marked, not silent


def test_modelfile_carries_template_and_stops(tokenizer):
    text = gguf_export.modelfile(tokenizer, "demo-q8_0.gguf", "You are a support assistant.")
    assert text == (
        'FROM ./demo-q8_0.gguf\n'
        'TEMPLATE """{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}<|im_start|>system\n'
        'You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n'
        '{{ end }}{{ range .Messages }}{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
        '{{ else }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n{{ end }}{{ end }}<|im_start|>assistant\n"""\n'
        'SYSTEM """You are a support assistant."""\n'
        'PARAMETER stop "<|im_end|>"\n')


def test_modelfile_for_llama3_leaves_bos_to_llama_cpp(tiny_path):
    from ftkit.core.modeling import load_tokenizer

    tok = load_tokenizer(tiny_path, chat_template="llama3")
    go = gguf_export.go_template(tok)
    assert tok.bos_token not in go
    assert '{{ else if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Content }}<|eot_id|>' in go
    assert go.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_modelfile_refuses_a_history_rewriting_template(tiny_path):
    from ftkit.core.modeling import load_tokenizer

    rewrite = ("{% for m in messages %}{% if loop.last %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
               "{% else %}<|im_start|>{{ m['role'] }}\n…<|im_end|>\n{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(GGUFExportError, match="no Ollama TEMPLATE"):
        gguf_export.go_template(load_tokenizer(tiny_path, chat_template=rewrite))


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_round_trip_smollm2(smollm_path, tmp_path, qtype):
    from ftkit.core.paths import RunPaths

    out = gguf_export.export_all(smollm_path, RunPaths(tmp_path, "s"), [qtype], PROMPTS)
    assert out["gguf_passed"], out
