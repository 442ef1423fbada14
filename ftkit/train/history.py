"""The training log: the loss curves' overfitting signal and the CSV copy of the history."""

from __future__ import annotations

from pathlib import Path


def overfitting(history: list[dict], patience: int = 2) -> dict:
    """Flag when validation loss rose over the last ``patience`` evaluations while training loss fell."""
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    trains = [(h["step"], h["loss"]) for h in history if "loss" in h]
    if len(evals) <= patience or len(trains) < 2:
        return {"flag": False, "reason": f"fewer than {patience + 1} evaluations"}
    recent = [v for _, v in evals[-(patience + 1):]]
    rising = all(b > a for a, b in zip(recent, recent[1:], strict=False))
    since = evals[-(patience + 1)][0]
    train_then = [v for st, v in trains if st <= since][-1:] or [trains[0][1]]
    falling = trains[-1][1] < train_then[0]
    flag = rising and falling
    best = min(evals, key=lambda e: e[1])
    reason = (f"val loss rose {recent[0]:.4f} -> {recent[-1]:.4f} over the last {patience} evaluations while "
              f"train loss fell; best val loss {best[1]:.4f} at step {best[0]}") if flag else \
        f"no sustained rise of val loss (best {best[1]:.4f} at step {best[0]})"
    return {"flag": flag, "reason": reason, "best_step": best[0], "best_eval_loss": best[1]}


def write_log_csv(history: list[dict], path: Path) -> None:
    import csv

    keys = sorted({k for h in history for k in h})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
