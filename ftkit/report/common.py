"""What the report notebooks show: provenance, tables and seaborn plots (no logic of the stages)."""

from __future__ import annotations

import html
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from ftkit.core.masking import IGNORE_INDEX
from ftkit.report.mailable import headless, log_stream, quiet_progress_bars, shown, shown_path, shown_tree

PACKAGES = ("ftkit", "torch", "transformers", "peft", "accelerate", "datasets", "papermill")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if sha.returncode != 0:
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def provenance(cfg, data_file: str | Path | None = None) -> dict:
    """Everything a reader needs to reproduce the run: config, seed, versions, commit, data hash (the
    program by name and the data file by :func:`shown_path`: the report names no folder of the machine)."""
    from ftkit.data.dataset import file_sha256

    out = {
        "experiment": cfg.experiment, "seed": cfg.seed, "git_commit": git_commit(), "versions": versions(),
        "platform": f"{platform.system()} {platform.machine()}", "argv": Path(sys.argv[0]).name if sys.argv else "",
    }
    if data_file and Path(data_file).exists():
        out["data_file"] = shown_path(data_file, cfg.outputs_dir)
        out["data_sha256"] = file_sha256(data_file)
    return out


def show_provenance(cfg, data_file=None) -> None:
    import yaml
    from IPython.display import Markdown, display

    prov = provenance(cfg, data_file)
    config = shown_tree(cfg.to_dict(), cfg.outputs_dir)
    display(Markdown("**Provenance**\n\n```yaml\n" + yaml.safe_dump(prov, sort_keys=False)
                     + "```\n\n<details><summary>Resolved config</summary>\n\n```yaml\n"
                     + yaml.safe_dump(config, sort_keys=False, allow_unicode=True) + "```\n</details>"))


def mask_html(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """HTML of a tokenised example: trained tokens on green, masked tokens grey."""
    spans = []
    for t, lab in zip(input_ids, labels, strict=True):
        text = html.escape(tokenizer.decode([t])).replace("\n", "¶<br>")  # a newline token, in a glyph every font has
        style = "background:#c8f7c5;color:#000" if lab != IGNORE_INDEX else "color:#888"
        spans.append(f'<span style="{style}" title="id {t}">{text}</span>')
    legend = ('<p><span style="background:#c8f7c5">trained (loss)</span> · '
              '<span style="color:#888">masked (context only)</span> · ¶ a newline</p>')
    return legend + '<div style="font-family:monospace;line-height:1.6">' + "".join(spans) + "</div>"


def plot_lengths(lengths: dict[str, list[int]], max_seq_len: int, title: str | None = None):
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    df = pd.DataFrame([{"split": s, "tokens": n} for s, lens in lengths.items() for n in lens])
    fig, ax = plt.subplots(figsize=(8, 3.5))
    sns.histplot(df, x="tokens", hue="split", element="step", bins=40, ax=ax)
    ax.axvline(max_seq_len, color="red", linestyle="--", label=f"max_seq_len={max_seq_len}")
    ax.set_title(title or "Tokens per example (chat template applied)")
    ax.legend()
    return fig


def plot_conversion_lengths(stage):
    """Stage 02's token lengths per split, titled with what the length policy did (a ConvertResult)."""
    m = stage.metrics
    dropped = m["quarantine_reasons"].get("over_length", 0)
    truncated = sum(s["truncated"] for s in m["token_stats"].values())
    split = sum(s["split_records"] for s in m["token_stats"].values())
    return plot_lengths(stage.conversion.lengths, m["max_seq_len"],
                        f"Tokens per example: {dropped} dropped, {truncated} truncated at a turn boundary, "
                        f"{split} texts split into max_seq_len pieces")


def quarantine_table(rows: list[dict], limit: int = 20):
    import pandas as pd

    if not rows:
        from IPython.display import Markdown

        return Markdown("No record was quarantined.")
    # source is path:LINE or path:ROW; stage 02's rows also carry the record's id (its stage 01 input)
    return pd.DataFrame([{"source": shown(r["source"]), **({"id": r["id"]} if "id" in r else {}),
                          "reason": shown(r["reason"])} for r in rows[:limit]])


def setup_notebook() -> None:
    """Readable logs and plots in a report notebook."""
    import logging
    import warnings

    import seaborn as sns

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True,
                        stream=log_stream())
    for noisy in ("httpx", "httpx2", "httpcore", "urllib3", "absl", "matplotlib"):  # matplotlib: categorical-axis notes
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional-kernel notice on import
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    if headless():
        quiet_progress_bars()
    sns.set_theme(style="whitegrid")


def _frame(rows):
    import pandas as pd

    return pd.DataFrame(rows)


def counts_table(metrics: dict):
    rows = [{"what": "rows in", "count": metrics["rows_in"]}, {"what": "rows kept", "count": metrics["rows_kept"]},
            {"what": "rows quarantined", "count": metrics["rows_quarantined"]}]
    rows += [{"what": f"  · {k}", "count": v} for k, v in metrics["quarantine_reasons"].items()]
    rows += [{"what": f"{k}: conversations ({metrics['rows'][k]} rows)", "count": v}
             for k, v in metrics["conversations"].items()]
    return _frame(rows).set_index("what")


def conversations_table(records: list[dict]):
    rows = []
    for r in records:
        if "text" in r and "messages" not in r:
            rows.append({"id": r["id"], "role": "text", "content": r["text"][:500]})
            continue
        rows += [{"id": r["id"], "role": m["role"], "content": m.get("content")} for m in r["messages"]]
    return _frame(rows).style.set_properties(**{"white-space": "pre-wrap", "text-align": "left"})


def detection_note(result) -> None:
    from IPython.display import Markdown, display

    d = result.detection
    cols = f" Columns: {d.columns}." if d.columns else ""
    outputs_dir = Path(result.quarantine_path).parent.parent.parent  # <outputs>/<exp>/data/quarantine.jsonl
    sources = [shown(s, outputs_dir) for s in result.sources]
    display(Markdown(f"Read **{len(sources)}** input(s): `{'`, `'.join(sources)}`.\n\n"
                     f"Format **{d.format}**: {d.reason}.{cols}"))


def cleaning_table(metrics: dict):
    rows = [{"what": f"PII found: {k}", "count": v} for k, v in metrics["pii_found"].items()] or [
        {"what": "PII found", "count": 0}]
    rows += [{"what": f"placeholder {{{{{k}}}}}", "count": v} for k, v in metrics["placeholders"].items()]
    rows.append({"what": "records with whitespace/Unicode fixed", "count": metrics["whitespace_fixed"]})
    rows.append({"what": "near-duplicates dropped", "count": metrics["quarantine_reasons"].get("near_duplicate", 0)})
    return _frame(rows).set_index("what")


def pii_note(metrics: dict) -> None:
    """What PII cleaning did, in words: where PII was found (sources and kinds, never the values) and, when
    scrubbed, excerpts of the text as training sees it."""
    from IPython.display import Markdown, display

    mode, n = metrics.get("pii_mode", "report"), metrics.get("pii_records", 0)
    if mode == "off":
        display(Markdown("PII: not looked for (`data.pii: off`)."))
        return
    if not n:
        display(Markdown(f"PII: none found ({', '.join(metrics.get('pii_found') or {}) or 'email, phone, card'} looked for)."))
        return
    where = "".join(f"\n- `{w['source']}`: {', '.join(f'{k} {v}' for k, v in w['found'].items())}"
                    for w in metrics.get("pii_where", []))
    if mode == "scrub":
        shown = "".join(f"\n> {e}\n" for e in metrics.get("pii_scrubbed_examples", []))
        display(Markdown(f"PII **scrubbed** in **{n:,}** records (`data.pii: scrub`): each match was replaced "
                         f"before training, so the model never sees it. First records:{where}\n\n"
                         f"As training sees them:\n{shown}"))
    else:
        display(Markdown(f"PII **found** in **{n:,}** records and **kept** (`data.pii: report`): the model will "
                         f"train on it. Set `data.pii: scrub` to replace each match with `[EMAIL]`, `[PHONE]`… "
                         f"First records (values not shown):{where}"))


def leakage_note(metrics: dict) -> None:
    from IPython.display import Markdown, display

    lk = metrics["leakage"]
    lines = [f"Near-duplicates of held-out records in train ({lk['method']}, threshold {lk['threshold']}):"]
    for name in ("val", "test"):
        v = lk[name]
        lines.append(f"- **{name}**: {v['near_duplicates_in_train']} of {v['records']} ({100 * v['share']:.1f}%)")
    if metrics.get("near_duplicate_method"):
        lines.append(f"\nDuplicates removed before splitting: {metrics['near_duplicate_method']}.")
    display(Markdown("\n".join(lines)))


def plot_record_lengths(stats: dict[str, dict[str, list]]):
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    df = pd.DataFrame([{"split": s, "characters": n} for s, st in stats.items() for n in st["chars"]])
    fig, ax = plt.subplots(figsize=(8, 3.5))
    if len(df):
        sns.histplot(df, x="characters", hue="split", element="step", bins=40, ax=ax)
    ax.set_title("Characters per conversation")
    return fig


def plot_balance(stats: dict[str, dict[str, list]], label_column: str | None, top: int = 20):
    """Share of each label (or of turns per conversation, without a label column) per split."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    key = "labels" if label_column else "turns"
    df = pd.DataFrame([{"split": s, "value": str(v) if label_column else f"{v} turn(s)"}
                       for s, st in stats.items() for v in st[key]])
    fig, ax = plt.subplots(figsize=(8, 3))
    if len(df):
        keep = df["value"].value_counts().index[:top]
        df = df[df["value"].isin(keep)]
        fig.set_figheight(max(2.5, 0.3 * len(keep)))
        sns.histplot(df, y="value", hue="split", multiple="dodge", stat="percent", common_norm=False, shrink=0.8,
                     ax=ax)
    ax.set_title(f"Balance by {label_column or 'turns per conversation'} (% of each split)")
    return fig


def template_note(metrics: dict) -> None:
    """Which chat template was used, where it came from, and what ftkit did for it."""
    from IPython.display import Markdown, display

    folded = sum(metrics.get("system_folded", {}).values())
    per_reply = sum(s.get("one_example_per_reply", 0) for s in metrics["token_stats"].values())
    parts = [f"Chat template: {metrics.get('chat_template', 'the model' + chr(39) + 's own')}; end of turn "
             f"`{metrics.get('end_of_turn_token')}`, pad `{metrics.get('pad_token')}`."]
    if folded:
        parts.append(f"{folded:,} records had their system message folded into the first user turn (the template "
                     "has no system role, or moves it); serving does the same.")
    if per_reply:
        parts.append(f"{per_reply:,} conversations are trained as one example per reply (the template rewrites "
                     "earlier turns, so each reply is trained as the last turn, as the model writes it).")
    display(Markdown(" ".join(parts)))


def preference_note(metrics: dict) -> None:
    """Preference data only: pairs and labelled replies per split, reply lengths and the length ratio."""
    from IPython.display import Markdown, display

    pref = metrics.get("preference")
    if not pref:
        return
    lines = []
    for split, p in pref.items():
        if p.get("pairs"):
            lines.append(f"- {split}: {p['pairs']} pairs; prompt {p['prompt_tokens_mean']:.0f} tokens, chosen "
                         f"{p['chosen_tokens_mean']:.0f}, rejected {p['rejected_tokens_mean']:.0f} on average; chosen/"
                         f"rejected length ratio {p['length_ratio_mean']:.2f}, chosen the longer in "
                         f"{100 * p['chosen_longer_share']:.0f}% of pairs")
        if p.get("kto_records"):
            lines.append(f"- {split}: {p['kto_records']} labelled replies, {100 * p['kto_desirable_share']:.0f}% good")
    display(Markdown("**Preference data.** A length gap between chosen and rejected is the easiest thing for DPO "
                     "to learn (length bias): compare the ratio with 1.\n\n" + "\n".join(lines)))


def token_stats_table(metrics: dict):
    rows = [{"split": s, "in": metrics["records_in"][s], "kept": metrics["kept"][s], **st}
            for s, st in metrics["token_stats"].items()]
    return _frame(rows).set_index("split").round(3)


def show_mask(tokenizer, examples) -> None:
    """Examples with trained tokens highlighted, and their trained text decoded."""
    from IPython.display import HTML, Markdown, display

    from ftkit.core.masking import trained_text

    for i, example in enumerate(examples if isinstance(examples, list) else [examples], 1):
        display(Markdown(f"**Example {i}** · {len(example.input_ids)} tokens, {example.n_trained} trained"))
        display(HTML(mask_html(tokenizer, example.input_ids, example.labels)))
        display(Markdown(f"Trained text, decoded: `{trained_text(tokenizer, example)!r}`"))


def metrics_table(metrics: dict):
    flat = {k: shown(v) if isinstance(v, str) else v for k, v in metrics.items() if not isinstance(v, (dict, list))}
    return _frame([{"metric": k, "value": v} for k, v in flat.items()]).set_index("metric")


def answers_table(answers: list[dict]):
    df = _frame([{"prompt": a["prompt"], "reply": a["reply"], "finish": a["finish_reason"],
                  "streamed chunks": a["stream_chunks"], "time to first token (s)": a["time_to_first_token_s"],
                  "seconds": a["seconds"]} for a in answers])
    return df.style.set_properties(**{"white-space": "pre-wrap", "text-align": "left"})


def validation_table(paths, result) -> None:
    """Format detection (stage 01) and every reason a record was set aside in stages 01 and 02."""
    from IPython.display import Markdown, display

    m1 = paths.read_metrics("01_data_prep")
    display(Markdown(f"Format **{m1['format']}**: {m1['format_reason']}."))
    rows = [{"stage": "01 read/convert/clean", "reason": k, "rows": v} for k, v in m1["quarantine_reasons"].items()]
    reasons: dict[str, int] = {}
    for q in result.quarantined:
        reasons[q["reason_code"]] = reasons.get(q["reason_code"], 0) + 1
    rows += [{"stage": "02 template/length/mask", "reason": k, "rows": v} for k, v in reasons.items()]
    if not rows:
        display(Markdown("Every record passed validation."))
        return
    display(_frame(rows))


def plot_example_stats(result):
    """Share of trained tokens per example, and assistant turns per conversation."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    df = pd.DataFrame([{"split": s, "trained share": sh, "turns": t} for s in result.trained_share
                       for sh, t in zip(result.trained_share[s], result.turns[s], strict=True)])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    if len(df):
        sns.histplot(df, x="trained share", hue="split", element="step", bins=30, ax=axes[0])
        sns.countplot(df, x="turns", hue="split", ax=axes[1])
    axes[0].set_title("Share of tokens that carry the loss, per example")
    axes[1].set_title("Assistant turns per conversation")
    fig.tight_layout()
    return fig


def _stage04(ev: dict) -> list[tuple[str, str]]:
    """Stage 04's estimate (``estimate_evaluate`` of stage 02's metrics) as a row, when there is one."""
    if ev.get("est_total_s") is None:
        return []
    return [("estimated evaluation time (stage 04)",
             f"{ev['est_total_s'] / 60:.1f} min: {ev['rows']:,} of {ev['total_rows']:,} test rows + the generations")]


def estimate_table(est, metrics: dict):
    train = metrics["token_stats"]["train"]
    rows = [
        ("training examples", f"{train['examples']:,}"),
        ("tokens per epoch (trained tokens)", f"{train['tokens']:,} ({train['trained_tokens']:,})"),
        ("tokens this run will process", f"{est.train_tokens:,}"),
        ("parameters (LoRA-trainable)", f"{est.parameters:,} ({est.trainable_parameters:,})"),
        ("memory estimate", f"{est.total_gb:.2f} GB = weights {est.weights_gb:.2f} + LoRA state "
                            f"{est.trainable_state_gb:.2f} + activations {est.activations_gb:.2f}"),
        ("device / measured matmul rate", f"{est.device} / {est.device_matmul_gflops:,.0f} GFLOP/s"),
        ("estimated training time", f"{est.est_train_seconds / 60:.1f} min"),
        *_stage04(metrics.get("estimate_evaluate") or {}),
        ("same tokens on a hosted fine-tuning API", f"${est.hosted_cost_usd:,.2f}"),
    ]
    return _frame([{"what": a, "value": b} for a, b in rows]).set_index("what")


from ftkit.report.training import plot_training, training_summary  # noqa: E402,F401  (the notebooks' names)
