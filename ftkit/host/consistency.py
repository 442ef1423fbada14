"""The train/serve check: the served model's prompt token ids must equal stage 02's training tokens, and
its replies must stop at the end-of-turn token the training taught, with the fix when they do not."""

from __future__ import annotations

from ftkit.core.files import read_jsonl
from ftkit.core.paths import RunPaths
from ftkit.host.client import api_key, client_for


def _trained_runs(labels: list[int]) -> list[int]:
    """Start positions of each contiguous run of trained tokens (one run per trained assistant turn)."""
    from ftkit.core.masking import IGNORE_INDEX

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
    client = client_for(server, api_key(cfg))
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
