"""``ftkit serve --engine vllm``: the command line and environment handed to vLLM, and what is refused.

vLLM itself is a CUDA build of several GB and is not installed here: a stand-in ``vllm`` executable on
PATH records the argv and environment ftkit execs it with, so these tests run the real CLI in a real
process up to the exec."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

FTKIT = str(ROOT / ".venv" / "bin" / "ftkit")


def _merged(src: str, dest: Path, stops: bool = True) -> Path:
    """A merged directory as stage 05 writes it (weights, tokenizer, template, stop tokens)."""
    from transformers import GenerationConfig

    from ftkit.core.modeling import load_tokenizer, stop_token_ids

    shutil.copytree(src, dest)
    gc = GenerationConfig.from_pretrained(dest)
    tok = load_tokenizer(str(dest))
    ids = stop_token_ids(tok)
    # without the stops: an id that is neither EOS nor end of turn (a config saved from another model)
    gc.eos_token_id = ids if stops else [next(i for i in range(10) if i not in ids)]
    gc.save_pretrained(dest)
    return dest


@pytest.fixture()
def fake_vllm(tmp_path):
    bin_dir, record = tmp_path / "bin", tmp_path / "vllm-call.json"
    bin_dir.mkdir()
    exe = bin_dir / "vllm"
    exe.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                   f"json.dump({{'argv': sys.argv[1:], 'key': os.environ.get('VLLM_API_KEY')}}, open({str(record)!r}, 'w'))\n")
    exe.chmod(0o755)
    return bin_dir, record


def _serve(model_dir, *args, path_dir=None, key=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST") and k != "FTKIT_API_KEY"}
    if path_dir is not None:
        env["PATH"] = f"{path_dir}{os.pathsep}{env['PATH']}"
    else:  # no vllm anywhere on PATH: only the venv's own tools
        env["PATH"] = str(ROOT / ".venv" / "bin")
    if key:
        env["FTKIT_API_KEY"] = key
    return subprocess.run([FTKIT, "serve", str(model_dir), "--engine", "vllm", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_vllm_gets_the_training_template_stops_and_key_off_the_command_line(tiny_path, tmp_path, fake_vllm):
    merged = _merged(tiny_path, tmp_path / "merged")
    bin_dir, record = fake_vllm
    proc = _serve(merged, "--name", "support-bot", "--port", "8123", "--host", "0.0.0.0", path_dir=bin_dir,
                  key="sk-test-123")
    assert proc.returncode == 0, proc.stderr[-2000:]
    call = json.loads(record.read_text())
    argv = call["argv"]
    assert argv[:2] == ["serve", str(merged.resolve())]
    opt = {argv[i]: argv[i + 1] for i in range(2, len(argv) - 1, 2)}
    assert opt["--chat-template"] == str(merged.resolve() / "chat_template.jinja")
    assert opt["--served-model-name"] == "support-bot" and opt["--port"] == "8123" and opt["--host"] == "0.0.0.0"
    assert opt["--generation-config"] == "auto"  # vLLM applies the saved stop tokens
    assert call["key"] == "sk-test-123" and "sk-test-123" not in " ".join(argv) + proc.stdout + proc.stderr


@pytest.mark.parametrize("case", ["no end-of-turn stop", "adapter", "public without key", "no vllm"])
def test_what_vllm_would_serve_wrongly_is_refused(case, tiny_path, tmp_path, fake_vllm):
    bin_dir, record = fake_vllm
    merged = _merged(tiny_path, tmp_path / "merged", stops=case != "no end-of-turn stop")
    args, path_dir, expect = [], bin_dir, None
    if case == "no end-of-turn stop":
        expect = "would not stop"
    elif case == "adapter":
        merged = tmp_path / "adapter"
        merged.mkdir()
        (merged / "adapter_config.json").write_text("{}")
        expect = "an adapter, not a merged model"
    elif case == "public without key":
        args, expect = ["--host", "0.0.0.0"], "without an API key"
    else:
        path_dir, expect = None, "vLLM is not installed"
    proc = _serve(merged, *args, path_dir=path_dir)
    assert proc.returncode == 2 and expect in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not record.exists()
