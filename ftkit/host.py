"""Stage 05, part two: talk to the running server with the official ``openai`` client."""

from __future__ import annotations

import time

from .formats import prompt_and_reference, with_system_prompt
from .paths import RunPaths, read_jsonl


def check_prompts(paths: RunPaths, n: int = 3) -> list[list[dict]]:
    """A few held-out chat prompts for the merge check."""
    records = [r for r in read_jsonl(paths.require(paths.chat("test"), "02_format_conversion")) if "messages" in r][:n]
    return [prompt_and_reference(r["messages"])[0] for r in records]


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
    client = client_for(server, cfg.host.api_key)
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
            # a reasoning model's <think> block, served apart from the answer (ftkit.reasoning)
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


def _trained_runs(labels: list[int]) -> list[int]:
    """Start positions of each contiguous run of trained tokens (one run per trained assistant turn)."""
    from .masking import IGNORE_INDEX

    return [k for k, lab in enumerate(labels) if lab != IGNORE_INDEX and (k == 0 or labels[k - 1] == IGNORE_INDEX)]


def consistency_check(server, cfg, paths: RunPaths, *, n: int | None = None, max_tokens: int | None = None) -> dict:
    """Train/serve consistency, through the running server's real request path.

    For each of ``n`` test conversations and each trained assistant turn, the conversation up to that
    turn goes to ``/v1/chat/completions`` with ``return_token_ids``; the server returns the prompt
    ids it fed the model, which must equal the training tokens (``formatted/test.tokens.jsonl``) up to
    the turn's first trained token, token for token. The replies must end with the end-of-turn token
    (``finish_reason == "stop"``) and never run on past it. Requests go out together, as a client
    would send them, so the check also exercises the batching engine.
    """
    from concurrent.futures import ThreadPoolExecutor

    n = n or cfg.host.consistency_examples
    max_tokens = min(max_tokens or cfg.host.consistency_max_tokens, cfg.host.max_tokens_cap)
    tokens = {r["id"]: r for r in read_jsonl(paths.require(paths.tokens("test"), "02_format_conversion"))}
    chats = [r for r in read_jsonl(paths.chat("test")) if "messages" in r and r["id"] in tokens][:n]
    cases = []
    for rec in chats:
        row = tokens[rec["id"]]
        turns = [i for i, m in enumerate(rec["messages"]) if m["role"] == "assistant" and m.get("weight", 1) != 0]
        for i, start in zip(turns, _trained_runs(row["labels"]), strict=False):  # truncated records: fewer runs
            cases.append({"id": rec["id"], "turn": i, "messages": rec["messages"][:i],
                          "expected": row["input_ids"][:start]})
    if not cases:
        raise ValueError(f"{paths.tokens('test')}: no test conversation with a trained assistant turn to check")
    client = client_for(server, cfg.host.api_key)
    model_id = client.models.list().data[0].id
    stop_ids = set(_served_stop_ids(server))

    def ask(case):
        resp = client.chat.completions.create(model=model_id, messages=case["messages"], max_tokens=max_tokens,
                                              temperature=0, extra_body={"return_token_ids": True})
        extra = resp.model_extra or {}
        ids = (resp.choices[0].model_extra or {}).get("token_ids", [])
        got = extra.get("prompt_token_ids")
        if got is None:
            raise RuntimeError(f"{server.base_url}: the server returned no prompt_token_ids; it must be ftkit serve")
        diverge = next((k for k, (a, b) in enumerate(zip(got, case["expected"], strict=False)) if a != b),
                       None if len(got) == len(case["expected"]) else min(len(got), len(case["expected"])))
        stopped = resp.choices[0].finish_reason == "stop" and bool(ids) and ids[-1] in stop_ids
        run_on = any(t in stop_ids for t in ids[:-1])
        return {"id": case["id"], "turn": case["turn"], "prompt_tokens": len(got),
                "prompt_matches": diverge is None, "first_difference_at": diverge,
                "stopped_at_end_of_turn": stopped, "ran_on_past_end_of_turn": run_on,
                "completion_tokens": len(ids), "reply": resp.choices[0].message.content}

    with ThreadPoolExecutor(max_workers=8) as pool:
        rows = list(pool.map(ask, cases))
    stop_rate = sum(r["stopped_at_end_of_turn"] for r in rows) / len(rows)
    prompts_ok = all(r["prompt_matches"] for r in rows)
    no_run_on = not any(r["ran_on_past_end_of_turn"] for r in rows)
    passed = prompts_ok and no_run_on and stop_rate >= cfg.host.min_stop_rate
    n_match = sum(r["prompt_matches"] for r in rows)
    facts = [f"{n_match}/{len(rows)} prompts equal their training tokens"]
    if not prompts_ok:
        bad = next(r for r in rows if not r["prompt_matches"])
        facts[-1] += f" (first difference: {bad['id']} turn {bad['turn']} at token {bad['first_difference_at']})"
    facts.append(f"{100 * stop_rate:.0f}% of replies end with the end-of-turn token within {max_tokens} tokens "
                 f"(required: {100 * cfg.host.min_stop_rate:.0f}%)")
    facts.append("no reply runs on past the end-of-turn token" if no_run_on else "a reply ran on past the end-of-turn token")
    if not prompts_ok:
        facts.append("fix: serve outputs/<experiment>/merged with its saved tokenizer (its chat template is the "
                     "training one); a server that renders prompts with another template answers a different prompt")
    if stop_rate < cfg.host.min_stop_rate:
        facts.append("fix: the tuned model has not learned to end its turn yet: train longer (train.max_steps or "
                     "train.epochs) or at a higher train.learning_rate, and check in report 02 that the end-of-turn "
                     "token is trained (green) after each reply")
    return {"consistency_passed": passed, "consistency_cases": len(rows), "consistency_prompts_match": prompts_ok,
            "consistency_stop_rate": stop_rate, "consistency_min_stop_rate": cfg.host.min_stop_rate,
            "consistency_no_run_on": no_run_on, "consistency_reason": "; ".join(facts), "consistency_rows": rows}


def _served_stop_ids(server) -> list[int]:
    """The stop ids the served model directory declares (its generation config)."""
    from transformers import GenerationConfig

    eos = GenerationConfig.from_pretrained(server.model_dir).eos_token_id
    return eos if isinstance(eos, list) else [eos]


def start_server(cfg, paths: RunPaths):
    """``ftkit serve`` on the merged model in the background, with the host section's limits; waits for health."""
    from .server_process import ServerProcess

    args = ["--max-tokens-cap", str(cfg.host.max_tokens_cap), "--kv-cache-tokens", str(cfg.host.kv_cache_tokens)]
    if cfg.host.max_prompt_tokens:
        args += ["--max-prompt-tokens", str(cfg.host.max_prompt_tokens)]
    if cfg.host.threads:
        args += ["--threads", str(cfg.host.threads)]
    return ServerProcess(paths.require(paths.merged_dir, "05_host (merge cell)"), host=cfg.host.host,
                         port=cfg.host.port, api_key=cfg.host.api_key, log_path=paths.server_log,
                         extra_args=args).start()


def serving_commands(cfg, paths: RunPaths, exports: dict | None = None) -> dict[str, str]:
    """Ready-to-run command lines for other servers, with this run's paths."""
    from .modeling import resolve_model_path

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


def chat_box(server, cfg):
    """An ipywidgets chat box streaming replies from the running server (interactive use only)."""
    import ipywidgets as widgets

    client = client_for(server, cfg.host.api_key)
    model_id = client.models.list().data[0].id
    history = [{"role": "system", "content": cfg.convert.system_prompt}] if cfg.convert.system_prompt else []
    box = widgets.Text(placeholder="Ask the fine-tuned model…", layout=widgets.Layout(width="70%"))
    send = widgets.Button(description="Send")
    out = widgets.Output(layout=widgets.Layout(border="1px solid #ddd", padding="6px"))

    def on_send(_):
        text, box.value = box.value.strip(), ""
        if not text:
            return
        history.append({"role": "user", "content": text})
        with out:
            print(f"you: {text}\nmodel: ", end="")
            pieces = []
            for chunk in client.chat.completions.create(model=model_id, messages=history, stream=True,
                                                        max_tokens=cfg.evaluate.max_new_tokens):
                delta = chunk.choices[0].delta.content if chunk.choices else None
                if delta:
                    pieces.append(delta)
                    print(delta, end="", flush=True)
            print("\n")
        history.append({"role": "assistant", "content": "".join(pieces)})

    send.on_click(on_send)
    chat = widgets.VBox([widgets.HBox([box, send]), out])
    chat.history = history  # the conversation so far (what the next request sends)
    return chat
