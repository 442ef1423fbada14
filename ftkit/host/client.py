"""Stage 05, part two: talk to the running server with the official ``openai`` client."""

from __future__ import annotations

import time

from ftkit.core.files import read_jsonl
from ftkit.core.formats import prompt_and_reference, with_system_prompt
from ftkit.core.paths import RunPaths


def check_prompts(paths: RunPaths, n: int = 3) -> list[list[dict]]:
    """A few held-out chat prompts for the merge check."""
    records = [r for r in read_jsonl(paths.require(paths.chat("test"), "02_format_conversion")) if "messages" in r][:n]
    return [prompt_and_reference(r["messages"])[0] for r in records]


def api_key(cfg) -> str | None:
    """The server's key: ``host.api_key`` (a notebook cell), else the environment variable ``host.api_key_env``."""
    import os

    return cfg.host.api_key or os.environ.get(cfg.host.api_key_env) or None


def client_for(server, api_key: str | None):
    from openai import OpenAI

    return OpenAI(base_url=server.base_url, api_key=api_key or "not-needed", max_retries=0, timeout=300)


def served_prompts(cfg, paths: RunPaths, n: int = 3) -> list[list[dict]]:
    """What stage 05 asks the served model: each of ``host.prompts`` (with the training system
    prompt), or, when none are set, the first ``n`` prompts of the test split as they were trained."""
    if cfg.host.prompts:
        return [with_system_prompt([{"role": "user", "content": p}], cfg.convert.system_prompt)
                for p in cfg.host.prompts]
    return check_prompts(paths, n)


def ask_all(server, cfg, paths: RunPaths) -> list[dict]:
    """Each of :func:`served_prompts`: once plain, once streamed."""
    client = client_for(server, api_key(cfg))
    model_id = client.models.list().data[0].id
    answers = []
    for messages in served_prompts(cfg, paths):
        t0 = time.perf_counter()
        resp = client.chat.completions.create(model=model_id, messages=messages, max_tokens=cfg.evaluate.max_new_tokens)
        plain_s = time.perf_counter() - t0
        t0, first, pieces, thought = time.perf_counter(), None, [], []
        for chunk in client.chat.completions.create(model=model_id, messages=messages, stream=True,
                                                    max_tokens=cfg.evaluate.max_new_tokens):
            delta = chunk.choices[0].delta if chunk.choices else None
            if delta is not None and (delta.content or (delta.model_extra or {}).get("reasoning_content")):
                first = first if first is not None else time.perf_counter() - t0
                if delta.content:
                    pieces.append(delta.content)
                else:
                    thought.append(delta.model_extra["reasoning_content"])
        answers.append({
            "prompt": messages[-1]["content"], "reply": resp.choices[0].message.content,
            # a reasoning model's <think> block, served apart from the answer (ftkit.core.reasoning)
            "reasoning": (resp.choices[0].message.model_extra or {}).get("reasoning_content"),
            "streamed_reasoning": "".join(thought) or None,
            "finish_reason": resp.choices[0].finish_reason,
            "completion_tokens": resp.usage.completion_tokens, "seconds": plain_s,
            "streamed_reply": "".join(pieces), "stream_chunks": len(pieces), "time_to_first_token_s": first,
        })
    return answers


def summary(answers: list[dict]) -> dict:
    return {
        "model_replies": len(answers),
        "all_stopped": all(a["finish_reason"] == "stop" for a in answers),
        "stream_matches_plain": all(a["streamed_reply"].strip() == a["reply"].strip() for a in answers),
        "answers": answers,
    }


def start_server(cfg, paths: RunPaths):
    """``ftkit serve`` on the merged model in the background, with the host section's limits; waits for health."""
    from ftkit.host.server_process import ServerProcess

    args = ["--max-tokens-cap", str(cfg.host.max_tokens_cap)]
    if cfg.host.kv_cache_tokens:
        args += ["--kv-cache-tokens", str(cfg.host.kv_cache_tokens)]
    if cfg.host.max_prompt_tokens:
        args += ["--max-prompt-tokens", str(cfg.host.max_prompt_tokens)]
    if cfg.host.threads:
        args += ["--threads", str(cfg.host.threads)]
    return ServerProcess(paths.require(paths.merged_dir, "05_host (merge cell)"), host=cfg.host.host,
                         port=cfg.host.port, api_key=api_key(cfg), log_path=paths.server_log,
                         extra_args=args).start()


def serving_commands(cfg, paths: RunPaths, exports: dict | None = None) -> dict[str, str]:
    """Ready-to-run command lines for other servers, with this run's paths."""
    from ftkit.core.modeling import resolve_model_path

    name = cfg.experiment
    max_len = cfg.convert.max_seq_len
    rank = cfg.train.lora.r
    out = {
        "ftkit (this server)": f"ftkit serve {paths.merged_dir} --port 8000 --name {name}",
        "vLLM, merged model": (f"vllm serve {paths.merged_dir} --served-model-name {name} --max-model-len {max_len} "
                               "--generation-config auto"),
    }
    if (paths.adapter_dir / "adapter_config.json").exists():
        out["vLLM, base + LoRA adapter"] = (
            f"vllm serve {resolve_model_path(cfg.model.name)} --enable-lora --max-lora-rank {max(rank, 8)} "
            f"--lora-modules {name}={paths.adapter_dir} --max-model-len {max_len}  # then call model '{name}'")
    for g in (exports or {}).get("gguf", []):
        out[f"llama.cpp server, {g['type']}"] = (f"llama-server -m {g['path']} --jinja -c {max_len} --port 8080 "
                                                 "# --jinja: the chat template stored in the GGUF")
    if (exports or {}).get("modelfile"):
        out["Ollama"] = f"cd {paths.exports_dir} && ollama create {name} -f Modelfile && ollama run {name}"
    return out


def headless() -> bool:
    """True under papermill (``make`` sets FTKIT_HEADLESS=1): no widgets, a fixed list of prompts instead."""
    import os

    return os.environ.get("FTKIT_HEADLESS") == "1"
