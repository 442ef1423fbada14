"""Report 03's (and 04's) training view: the loss curves and the run's summary table."""

from __future__ import annotations


def plot_training(history: list[dict], overfit: dict | None = None):
    """Train/val loss (with the overfitting flag), learning rate and gradient norm per step."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    rows = [{"step": h["step"], "loss": h["loss"], "split": "train"} for h in history if "loss" in h]
    rows += [{"step": h["step"], "loss": h["eval_loss"], "split": "val"} for h in history if "eval_loss" in h]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.4))
    if rows:
        sns.lineplot(pd.DataFrame(rows), x="step", y="loss", hue="split", marker="o", ax=axes[0])
    # TRL's preference losses are per pair (or per reply), not per token
    title = "Preference loss" if any("rewards/margins" in h for h in history) else "Loss per trained token"
    if overfit and overfit.get("flag"):
        title += " (overfitting flagged)"
        axes[0].axvline(overfit["best_step"], color="red", linestyle="--", label="best val")
    axes[0].set_title(title)
    for ax, key, label in ((axes[1], "learning_rate", "Learning rate"), (axes[2], "grad_norm", "Gradient norm")):
        pts = [(h["step"], h[key]) for h in history if key in h and "loss" in h]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=".")
        ax.set_title(label)
        ax.set_xlabel("step")
    fig.tight_layout()
    return fig


def training_summary(metrics: dict):
    keys = [("method", "method"), ("steps", "steps"), ("train examples", "train_examples"),
            ("train loss (mean / last)", None), ("val loss", "eval_loss"), ("tokens trained on", "train_tokens"),
            ("tokens/s", "tokens_per_second"), ("peak memory (MB)", "peak_memory_mb"), ("runtime (s)", "runtime_s"),
            ("trainable / total parameters", None), ("packing", "packing"), ("resumed from", "resumed_from")]
    rows = []
    for label, key in keys:
        if label.startswith("train loss"):
            value = f"{metrics['train_loss']:.4f} / {metrics['train_loss_last']:.4f}"
        elif label.startswith("trainable"):
            value = (f"{metrics['trainable_params']:,} / {metrics['total_params']:,} "
                     f"({100 * metrics['trainable_params'] / metrics['total_params']:.2f}%)")
        else:
            v = metrics.get(key)
            value = f"{v:,.4g}" if isinstance(v, float) else (f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else v)
        rows.append({"what": label, "value": value})
    if metrics.get("stopped_at_step"):
        rows.append({"what": "stopped", "value": f"by request at step {metrics['stopped_at_step']} of "
                     f"{metrics.get('planned_steps')}: the next run resumes from its checkpoint"})
    rows.append({"what": "model's own code", "value": (
        "RUN: model.trust_remote_code is true, so the repository's Python code ran here"
        if metrics.get("trust_remote_code") else "not run (model.trust_remote_code: false)")})
    rows.append({"what": "weights loaded from", "value": (
        "safetensors, or pickle files (model.allow_pickle_weights: true)" if metrics.get("allow_pickle_weights")
        else "safetensors only (pickle checkpoints refused)")})
    from ftkit.core.config import PREFERENCE_OBJECTIVES

    if metrics.get("objective") in PREFERENCE_OBJECTIVES:
        start = metrics.get("init_adapter") or ("the base model's weights" if metrics.get("method") == "full"
                                                 else "a new adapter")
        rows.append({"what": "objective", "value": f"{metrics['objective']} (TRL), starting from "
                     f"{start}"})
        for split, figures in (metrics.get("preference") or {}).items():  # TRL's last logged figures
            rows.append({"what": f"preference, {split}", "value": "\n".join(
                f"{k}: {v:.4g}" for k, v in figures.items())})
    rows.append({"what": "overfitting", "value": metrics["overfitting"]["reason"]})
    rows.append({"what": "checkpoints", "value": "\n".join(metrics.get("checkpoints") or []) or "none (train.save_steps: 0)"})
    from ftkit.report.common import _frame

    return _frame(rows).set_index("what").style.set_properties(**{"white-space": "pre-wrap", "text-align": "left"})
