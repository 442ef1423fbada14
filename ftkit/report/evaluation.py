"""Stage 04's report: the three-way table with intervals, the verdict, plots and side-by-side samples."""

from __future__ import annotations

from ftkit.evaluate.scoring import LOWER_IS_BETTER, MODELS, NAMES

TABLE = ("loss", "perplexity", "rule_pass_rate", "rougeL", "chrF", "bleu", "exact_match", "token_f1", "accuracy",
         "json_valid_rate", "stop_rate", "mean_new_tokens")


def _models(metrics: dict) -> list[str]:
    return [m for m in MODELS if m in metrics]


def _fmt(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def _ci(d: dict | None, value_key: str = "value") -> str:
    if not d:
        return "—"
    return f"{_fmt(d[value_key])} [{_fmt(d['ci_low'])}, {_fmt(d['ci_high'])}]"


def comparison_table(metrics: dict):
    """Every metric for each model (value [CI]) and the paired differences tuned − prompted, tuned − base."""
    import pandas as pd

    level = round(metrics["confidence"] * 100)
    rows = []
    for k in TABLE:
        if not any(metrics[m].get(k) is not None for m in _models(metrics)):
            continue
        row = {"metric": NAMES.get(k, k) + (" ↓" if k in LOWER_IS_BETTER else "")}
        for m in _models(metrics):
            row[m] = _ci(metrics[m].get("ci", {}).get(k)) if k in metrics[m].get("ci", {}) else _fmt(metrics[m].get(k))
        for pair in ("tuned_vs_prompted", "tuned_vs_base", "tuned_vs_sft"):
            if pair not in metrics["deltas"]:
                continue
            a, b = pair.split("_vs_")
            row[f"{a} − {b} [{level}% CI]"] = _ci(metrics["deltas"].get(pair, {}).get(k), "delta")
        rows.append(row)
    return pd.DataFrame(rows).set_index("metric")


def show_verdict(metrics: dict) -> None:
    from IPython.display import Markdown, display

    b, t = metrics["base"], metrics["tuned"]
    lines = [f"On {metrics['test_examples']} test conversations (loss) and {metrics['generations']} generated "
             f"replies per model; held-out loss per assistant token {b['loss']:.3f} (base) → "
             f"{t['loss']:.3f} (tuned), {100 * metrics['loss_reduction']:.1f}% lower.", ""]
    budget = metrics.get("eval_budget")
    if budget:  # what the loss passes read, and the interval width that bought
        lines[0:0] = [f"Rows read: {budget['reason']}." + (f" {metrics['interval_note']}." if metrics.get("interval_note")
                                                         else ""), ""]
    lines += [f"- {s}" for s in metrics["verdict"]]
    ref = metrics.get("reference") or {}
    if ref.get("rule_pass_rate") is not None:
        lines.append(f"- The reference replies themselves pass the house rules {100 * ref['rule_pass_rate']:.0f}% of "
                     f"the time (the ceiling); base {100 * b['rule_pass_rate']:.0f}%, prompted "
                     f"{100 * metrics['prompted']['rule_pass_rate']:.0f}%, tuned {100 * t['rule_pass_rate']:.0f}%."
                     if "prompted" in metrics else
                     f"- The reference replies themselves pass the house rules {100 * ref['rule_pass_rate']:.0f}% of "
                     "the time (the ceiling).")
    f = metrics["forgetting"]
    lines += ["", f"- **Forgetting** ({f['examples']} general questions): loss {f['base']['loss']:.3f} → "
              f"{f['tuned']['loss']:.3f} ({100 * f['relative_loss_increase']:+.1f}%), stop rate "
              f"{100 * f['base']['stop_rate']:.0f}% → {100 * f['tuned']['stop_rate']:.0f}%: "
              + ("**flagged**: " if f["flag"] else "") + f["reason"] + "."]
    o = metrics.get("overfitting")
    if o:
        lines.append("- **Overfitting**: " + ("**flagged**: " if o.get("flag") else "") + o["reason"] + ".")
    for pair, j in (metrics.get("judge") or {}).items():
        lines.append(f"- **Judge**, {pair.replace('_vs_', ' vs ')}: tuned wins {100 * j['win_rate']:.0f}% "
                     f"(CI [{100 * j['ci_low']:.0f}%, {100 * j['ci_high']:.0f}%]; {j['wins']} wins, {j['losses']} "
                     f"losses, {j['ties']} ties over {j['pairs']} prompts, each judged in both orders).")
    display(Markdown("\n".join(lines)))


def plot_metrics(metrics: dict, keys=("loss", "rule_pass_rate", "rougeL", "chrF", "token_f1", "stop_rate")):
    """One panel per metric: a bar per model with its bootstrap interval."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    keys = [k for k in keys if all(k in metrics[m].get("ci", {}) for m in _models(metrics))]
    fig, axes = plt.subplots(1, len(keys), figsize=(2.6 * len(keys), 3.2), squeeze=False)
    deep = sns.color_palette("deep", len(MODELS))  # one colour per model, the same in every plot
    for ax, k in zip(axes[0], keys, strict=True):
        models = _models(metrics)
        cis = [metrics[m]["ci"][k] for m in models]
        values = [c["value"] for c in cis]
        err = [[v - c["ci_low"] for v, c in zip(values, cis, strict=True)],
               [c["ci_high"] - v for v, c in zip(values, cis, strict=True)]]
        sns.barplot(x=models, y=values, hue=models, palette={m: deep[MODELS.index(m)] for m in models}, legend=False,
                    ax=ax)
        ax.errorbar(range(len(models)), values, yerr=err, fmt="none", ecolor="black", capsize=4)
        ax.set_title(NAMES.get(k, k) + (" (lower is better)" if k in LOWER_IS_BETTER else ""), fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"Test metrics with {round(metrics['confidence'] * 100)}% bootstrap intervals", fontsize=10)
    fig.tight_layout()
    return fig


def plot_lengths(rows: list[dict], models=MODELS):
    """Reply lengths in words per model, with the references for comparison."""
    import pandas as pd
    import seaborn as sns

    data = [{"who": "reference", "words": len(r["reference"].split())} for r in rows]
    data += [{"who": m, "words": len(r[m].split())} for r in rows for m in models if m in r]
    deep = sns.color_palette("deep", len(MODELS))
    palette = {"reference": "0.5", **{m: deep[i] for i, m in enumerate(MODELS)}}  # same colours as plot_metrics
    order = ["reference"] + [m for m in models if any(d["who"] == m for d in data)]
    ax = sns.histplot(pd.DataFrame(data), x="words", hue="who", hue_order=order, palette=palette, element="step",
                      stat="count", common_bins=True)
    ax.set_title("Reply length (words)")
    return ax.figure


def plot_confusion(metrics: dict):
    """Confusion matrices of the three models when replies are labels; None otherwise."""
    if metrics.get("task") != "label":
        return None
    import matplotlib.pyplot as plt
    import seaborn as sns

    models = _models(metrics)
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models, strict=True):
        labels = metrics[m]["labels"]
        sns.heatmap(metrics[m]["confusion_matrix"], annot=True, fmt="d", cbar=False, xticklabels=labels,
                    yticklabels=labels, ax=ax)
        ax.set(title=f"{m}: accuracy {metrics[m]['accuracy']:.2f}", xlabel="predicted", ylabel="reference")
    fig.tight_layout()
    return fig


def samples_table(rows: list[dict], limit: int = 10):
    """Prompt / reference / base / prompted / tuned, with the tuned reply's rule failures."""
    import pandas as pd

    cols = [m for m in MODELS if rows and m in rows[0]]
    df = pd.DataFrame([{"prompt": r["prompt"], "reference": r["reference"], **{m: r[m] for m in cols},
                        "tuned rule failures": "; ".join(r.get("tuned_rules", [])) or "—"} for r in rows[:limit]])
    return df.style.set_properties(**{"white-space": "pre-wrap", "text-align": "left", "vertical-align": "top"})


def forgetting_table(metrics: dict):
    import pandas as pd

    f = metrics["forgetting"]
    d = f["loss_delta"]
    return pd.DataFrame([
        {"": "loss on reference answers ↓", "base": _fmt(f["base"]["loss"]), "tuned": _fmt(f["tuned"]["loss"]),
         "tuned − base [CI]": _ci(d, "delta")},
        {"": "stop rate", "base": _fmt(f["base"]["stop_rate"]), "tuned": _fmt(f["tuned"]["stop_rate"]),
         "tuned − base [CI]": _fmt(-f["stop_rate_drop"])},
        {"": "token F1 vs reference", "base": _fmt(f["base"]["token_f1"]), "tuned": _fmt(f["tuned"]["token_f1"]),
         "tuned − base [CI]": _fmt(f["tuned"]["token_f1"] - f["base"]["token_f1"])},
    ]).set_index("")


def preference_table(metrics: dict):
    """Held-out pairs: preference accuracy and reward margins of the tuned model against its reference, and
    how often each ranks the chosen reply above the rejected one by likelihood (None without pairs)."""
    import pandas as pd
    from IPython.display import Markdown, display

    p = metrics.get("preference")
    if not p:
        display(Markdown("No held-out preference pairs in the test split: nothing to rank."))
        return None
    level = round(metrics["confidence"] * 100)
    display(Markdown(f"{p['pairs']} held-out pairs; implicit reward β × (log p tuned − log p reference), β = "
                     f"{p['beta']}, reference: {p['reference']}. Accuracy 0.5 is chance."))
    rows = [("preference accuracy (reward: chosen above rejected)", p["accuracy"]),
            ("reward margin, chosen − rejected", p["margin"]),
            ("reward of the chosen reply", p["reward_chosen"]),
            ("reward of the rejected reply", p["reward_rejected"]),
            ("chosen more likely than rejected: reference", p["ranked_by_reference"]),
            ("chosen more likely than rejected: tuned", p["ranked_by_tuned"])]
    out = [{"": name, f"value [{level}% CI]": _ci(d)} for name, d in rows]
    out.append({"": "… tuned − reference (paired)", f"value [{level}% CI]": _ci(p["ranked_tuned_vs_reference"], "delta")})
    return pd.DataFrame(out).set_index("")
