"""The forgetting check: base and tuned on general prompts the tuning data never held."""

from __future__ import annotations

import contextlib
import json
from importlib import resources

from ftkit.core.formats import prompt_and_reference, with_system_prompt
from ftkit.core.masking import build_example
from ftkit.core.progress import Progress
from ftkit.evaluate.loss import example_losses, summarise_loss
from ftkit.evaluate.metrics import (
    Sample,
    paired_bootstrap,
    token_f1,
)
from ftkit.evaluate.replies import generate_with_progress


def general_records(path: str | None) -> list[dict]:
    """General questions with reference answers: the user's file or the 40 shipped ones."""
    if path:
        from ftkit.core.replay import from_file

        recs = from_file(path)
    else:
        text = resources.files("ftkit").joinpath("resources/general_eval.jsonl").read_text(encoding="utf-8")
        recs = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [r for r in recs if r.get("messages") and r["messages"][-1]["role"] == "assistant"]


def forgetting_check(cfg, tok, base_ctx, tuned_model, base_model, stop_ids: list[int]) -> dict:
    """Base vs tuned on general questions: loss on reference answers, stop rate and token F1 of replies."""
    f = cfg.evaluate.forgetting
    e = cfg.evaluate
    recs = [{**r, "messages": with_system_prompt(r["messages"], cfg.convert.system_prompt)}
            for r in general_records(f.path)]
    rows = [build_example(tok, r["messages"]).to_dict() for r in recs]
    sample = recs[: f.num_generations]
    prompts = [prompt_and_reference(r["messages"])[0] for r in sample]
    refs = [prompt_and_reference(r["messages"])[1] for r in sample]
    out, samples = {}, {}
    for name, model in (("base", base_model), ("tuned", tuned_model)):
        with base_ctx() if name == "base" else contextlib.nullcontext():
            with Progress(f"04_evaluate: forgetting, {name} loss", len(rows), unit="rows") as progress:
                sums, counts = example_losses(model, rows, tok.pad_token_id, e.batch_size, progress=progress)
            gens = generate_with_progress(f"04_evaluate: forgetting, {name}", model, tok, prompts,
                                          max_new_tokens=f.max_new_tokens, batch_size=e.generation_batch_size,
                                          stop_ids=stop_ids, seed=cfg.seed)
        out[name] = {**summarise_loss(sums, counts),
                     "stop_rate": sum(g["stopped"] for g in gens) / max(len(gens), 1),
                     "token_f1": sum(token_f1(g["text"], r) for g, r in zip(gens, refs, strict=True)) / max(len(gens), 1)}
        samples[name] = Sample.of(sums, counts)
        out[name + "_replies"] = [g["text"] for g in gens[:5]]
    kw = {"resamples": e.bootstrap_samples, "confidence": e.confidence, "seed": cfg.seed}
    loss_delta = paired_bootstrap(samples["base"], samples["tuned"], **kw)
    rel = out["tuned"]["loss"] / out["base"]["loss"] - 1
    stop_drop = out["base"]["stop_rate"] - out["tuned"]["stop_rate"]
    reasons = []
    if rel > f.max_loss_increase:
        reasons.append(f"general-answer loss rose {100 * rel:.1f}% (limit {100 * f.max_loss_increase:.0f}%)")
    if stop_drop > f.max_stop_rate_drop:
        reasons.append(f"stop rate on general questions fell by {100 * stop_drop:.0f} points "
                       f"(limit {100 * f.max_stop_rate_drop:.0f})")
    if reasons and cfg.data.general_mix <= 0:  # the remedy, named where the problem is reported
        reasons.append("the forgetting guard is off: data.general_mix: 0.1 mixes general answers into train")
    return {**out, "loss_delta": loss_delta, "relative_loss_increase": rel, "stop_rate_drop": stop_drop,
            "flag": bool(reasons), "reason": "; ".join(reasons) or "no degradation beyond the configured limits",
            "examples": len(rows), "source": f.path or "ftkit/resources/general_eval.jsonl"}
