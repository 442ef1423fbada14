"""What the stage 05 report shows: merge and consistency verdicts, exports, load and cost tables and plots."""

from __future__ import annotations

import math

from ftkit.report.mailable import shown


def _frame(rows):
    import pandas as pd

    return pd.DataFrame(rows)


def _md(text: str) -> None:
    from IPython.display import Markdown, display

    display(Markdown(text))


def _mark(ok: bool) -> str:
    return "PASS" if ok else "FAIL"  # words, not emoji: the report must read the same in any font


def merge_summary(m: dict) -> None:
    base = m.get("max_logit_diff_adapter_vs_base")
    lines = [f"**Merge check: {_mark(m['merge_check_passed'])}** ({m.get('method', 'lora')}, merged in "
             f"{m.get('merged_dtype', 'its saved dtype')})",
             f"- merged vs base + adapter: max |Δlogit| {m['max_logit_diff_merged_vs_adapter']:.2e} = "
             f"{m['relative_logit_diff']:.2e} of the logit scale (tolerance {m['relative_tolerance']:.0e}), "
             f"same greedy token on {100 * m['top1_agreement']:.1f}% of positions",
             f"- for scale: the adapter moved the logits by up to {base:.2f} from the base model's" if base else "",
             f"- saved generation config stops on {m['saved_eos_token_ids']} (end-of-turn `{m['end_of_turn_token']}` "
             f"included: {m['saved_eos_includes_end_of_turn']}); saved chat template = training template: "
             f"{m['saved_chat_template_matches']}"]
    _md("\n".join(x for x in lines if x))


def consistency(check: dict):
    _md(f"**Train/serve consistency: {_mark(check['consistency_passed'])}** — {check['consistency_reason']}.\n\n"
        f"{check['consistency_cases']} requests to the running server; prompt tokens equal to training tokens: "
        f"{check['consistency_prompts_match']}; replies ending with the end-of-turn token: "
        f"{100 * check['consistency_stop_rate']:.0f}%; a reply running on past it: {not check['consistency_no_run_on']}.")
    df = _frame([{k: r[k] for k in ("id", "turn", "prompt_tokens", "prompt_matches", "stopped_at_end_of_turn",
                                    "completion_tokens", "reply")} for r in check["consistency_rows"]])
    return df.style.set_properties(**{"white-space": "pre-wrap", "text-align": "left"})


def streaming_note(answers: list[dict]) -> None:
    a = answers[0]
    _md(f"Streamed through the `openai` client: **{a['stream_chunks']} chunks**, first after "
        f"{a['time_to_first_token_s']:.2f} s; the streamed text equals the plain reply: "
        f"{a['streamed_reply'].strip() == a['reply'].strip()}.\n\n> {a['streamed_reply']}")


def load_table(levels: list[dict]):
    rows = [{"concurrent clients": lv["concurrency"], "requests": lv["requests"],
             "TTFT median (s)": lv["ttft_median_s"], "TTFT p90 (s)": lv["ttft_p90_s"],
             "tokens/s, all clients": lv["tokens_per_s_total"], "tokens/s, per request": lv["tokens_per_s_per_request"],
             "requests/s": lv["requests_per_s"]} for lv in levels]
    return _frame(rows).set_index("concurrent clients").round(3)


def plot_load(levels: list[dict]):
    import matplotlib.pyplot as plt

    c = [lv["concurrency"] for lv in levels]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    axes[0].plot(c, [lv["tokens_per_s_total"] for lv in levels], marker="o", label="all clients")
    axes[0].plot(c, [lv["tokens_per_s_per_request"] for lv in levels], marker="o", label="per request")
    axes[0].set_title("Tokens/s")
    axes[0].legend()
    axes[1].plot(c, [lv["ttft_median_s"] for lv in levels], marker="o", label="median")
    axes[1].plot(c, [lv["ttft_p90_s"] for lv in levels], marker="o", label="p90")
    axes[1].set_title("Time to first token (s)")
    axes[1].legend()
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(c, [str(x) for x in c])
        ax.set_xlabel("concurrent clients")
    fig.tight_layout()
    return fig


def cost_table(costs: dict, host):
    pb = costs["payback_months"]
    rows = [
        ("requests per day × prompt + reply tokens per request",
         f"{host.requests_per_day:,} × {host.tokens_per_request:,}"),
        ("tokens per month (what the hosted API bills)", f"{costs['tokens_per_month']:,.0f}"),
        ("needed / measured requests per second (one machine)",
         f"{costs['needed_requests_per_s']:,.3f} / {costs['measured_requests_per_s']:,.3f}" + _measured_on(costs)),
        ("machines (whole, running all month)", f"{costs['machines']}"),
        ("hosted API per month", f"${costs['hosted_monthly_usd']:,.2f} (at ${host.hosted_price_per_million_tokens}/1M tokens)"),
        ("self-hosted per month", f"${costs['self_hosted_monthly_usd']:,.2f} (at ${host.machine_hourly_usd}/hour)"),
        ("monthly saving", f"${costs['monthly_saving_usd']:,.2f}"),
        ("fine-tune cost (one-off)", f"${costs['fine_tune_cost_usd']:,.2f}"),
        ("payback period", "never (self-hosting costs more at this volume)" if math.isinf(pb) else f"{pb:.1f} months"),
    ]
    return _frame([{"what": a, "value": b} for a, b in rows]).set_index("what")


def _measured_on(costs: dict) -> str:
    """What size of request the requests/s were measured on: replies longer than that take longer."""
    reply = costs.get("measured_reply_tokens_per_request")
    return f" (measured with replies of {reply:,.0f} tokens on average)" if reply else ""


def plot_cost(cumulative: list[dict]):
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    df = pd.DataFrame(cumulative).melt(id_vars="month", var_name="path", value_name="cumulative USD")
    fig, ax = plt.subplots(figsize=(8, 3.2))
    sns.lineplot(df, x="month", y="cumulative USD", hue="path", ax=ax)
    ax.set_title("Cumulative cost: hosted API vs fine-tuned and self-hosted")
    return fig


def gguf_table(exports: dict):
    """One row per GGUF file and checker (transformers' reader, llama.cpp), then what was skipped and why."""
    rows = []
    for g in exports.get("gguf", []):
        for name in ("transformers", "llama_cpp"):
            c = g[name]
            row = {"file": g["path"].rsplit("/", 1)[-1], "MB": g["bytes"] / 1e6, "checked by": name.replace("_", ".")}
            if not c["checked"]:
                rows.append({**row, "result": f"not checked: {c['reason']}"})
                continue
            rows.append({**row, "relative Δlogit (tolerance)": f"{c['relative_logit_diff']:.2e} ({c['relative_tolerance']:.0e})",
                         "same greedy token": f"{100 * c['top1_agreement']:.1f}% (≥ {100 * c['min_top1_agreement']:.0f}%)",
                         "mean KL (max)": f"{c['mean_kl_divergence']:.1e} ({c['max_mean_kl_divergence']:.0e})",
                         "generation agrees": (f"{100 * c['generation_agreement']:.0f}% of {c['generated_tokens']}"
                                               if "generation_agreement" in c else "-"),
                         "result": _mark(c["passed"])})
    for s in exports.get("gguf_skipped", []):
        _md(f"GGUF {s['type']} skipped: {s['reason']}")
    if not rows:
        _md(exports.get("gguf_note") or "No GGUF export (host.gguf_types is empty).")
        return None
    note = f"Ollama Modelfile: `{shown(exports['modelfile'])}`." if exports.get("modelfile") else exports.get("modelfile_note", "")
    _md("GGUF files written by llama.cpp's converter, read back and compared with the merged model on held-out "
        f"prompts. {note}")
    return _frame(rows).set_index("file")


def commands(cmds: dict[str, str]) -> None:
    _md("\n\n".join(f"**{k}**\n```bash\n{shown(v)}\n```" for k, v in cmds.items()))


def try_it(answers: list[dict]) -> None:
    _md("\n\n".join(f"**you:** {a['prompt']}\n\n**model:** {a['reply']}" for a in answers))
