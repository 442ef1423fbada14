"""``ftkit serve --engine vllm``: vLLM's OpenAI server on a merged model directory, set up to serve what
was trained.

vLLM is the GPU path for many concurrent streams (paged attention, CUDA graphs, continuous batching in
its own scheduler): ftkit's own engine (:mod:`ftkit.host.engine`, transformers' continuous batching)
reached 3-5% of the decode memory-bandwidth bound on an H200 (docs/serving.md). ftkit does not depend on
vLLM (a CUDA build of several GB); this module only builds its command line and environment and checks
the directory first:

- the directory is a merged model (vLLM serves an adapter only with ``--enable-lora`` and a base: merge
  with stage 05 instead, which is what ftkit tests);
- its chat template is passed explicitly (``--chat-template``), so vLLM renders prompts with the template
  training used, not a default of its own;
- its ``generation_config.json`` stops on the end-of-turn token (vLLM applies that file by default,
  ``--generation-config auto``), checked as stage 05 checks it;
- the API key goes through ``VLLM_API_KEY`` in the environment, never the command line (which any user
  of the machine can read in ``ps``); a non-loopback address without a key is refused, as ``ftkit serve``
  refuses it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


class VLLMSetupError(ValueError):
    """The directory or the options cannot be served by vLLM as trained: the message says what to do."""


def vllm_command(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                 name: str | None = None, max_prompt_tokens: int | None = None) -> tuple[list[str], dict[str, str]]:
    """(argv, environment additions) for ``vllm serve`` on ``model_dir``; raises :class:`VLLMSetupError`."""
    from ftkit.host.serve import is_loopback

    model_dir = Path(model_dir).resolve()
    if (model_dir / "adapter_config.json").is_file() and not (model_dir / "config.json").is_file():
        raise VLLMSetupError(f"{model_dir}: an adapter, not a merged model; vLLM serves the merged directory "
                             "stage 05 writes (outputs/<experiment>/merged): serve that")
    if not (model_dir / "config.json").is_file():
        raise VLLMSetupError(f"{model_dir}: not a model directory (no config.json); serve outputs/<experiment>/merged")
    if not is_loopback(host) and not api_key:
        raise VLLMSetupError(f"refusing to bind to {host} without an API key: set FTKIT_API_KEY (or --api-key), "
                             "or bind to 127.0.0.1")
    template = model_dir / "chat_template.jinja"
    if not template.is_file():
        raise VLLMSetupError(f"{model_dir}: no chat_template.jinja; vLLM would fall back to a template of its own. "
                             "Serve the merged directory stage 05 writes (it saves the training template there)")
    _check_stops(model_dir)
    argv = ["vllm", "serve", str(model_dir), "--host", host, "--port", str(port),
            "--served-model-name", name or model_dir.name, "--chat-template", str(template),
            "--generation-config", "auto", "--dtype", "bfloat16"]
    if max_prompt_tokens:
        argv += ["--max-model-len", str(max_prompt_tokens)]
    env = {"VLLM_API_KEY": api_key} if api_key else {}
    return argv, env


def _check_stops(model_dir: Path) -> None:
    """The saved generation config stops on the chat template's end-of-turn token (stage 05's check)."""
    from ftkit.core.modeling import load_tokenizer
    from ftkit.host.merge import check_saved_model

    try:
        check_saved_model(model_dir, load_tokenizer(str(model_dir)))
    except RuntimeError as e:
        raise VLLMSetupError(f"{e}; export the model with stage 05 (it writes the stop tokens and the template)") from None


def exec_vllm(argv: list[str], env: dict[str, str]) -> None:
    """Replace this process with vLLM's server (signals and exit code are then vLLM's own)."""
    exe = shutil.which(argv[0])
    if exe is None:
        raise VLLMSetupError("vLLM is not installed here: `pip install vllm` on a CUDA machine (it is not an ftkit "
                             "dependency), or serve with ftkit's own engine (leave --engine out)")
    os.execve(exe, argv, {**os.environ, **env})
