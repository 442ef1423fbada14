"""Stage 04: did fine-tuning help, and what did it cost? Base, prompted base and tuned, side by side.

Three models answer the same held-out test prompts:

- ``base``: the base model (for adapters: the same weights with the adapter disabled);
- ``prompted``: the base model given ``evaluate.prompting.system_prompt`` and ``few_shot`` train
  conversations (a seeded choice, the same for every prompt) before each test prompt;
- ``tuned``: the fine-tuned model.

Loss and perplexity are per trained (assistant) token over the test split, streamed: each batch's
per-example losses are summed and its logits dropped, rows are read from disk in chunks, so memory
does not grow with the test set. Generations (greedy unless ``do_sample``) for the first
``num_generations`` test prompts are scored with ROUGE-L, chrF, BLEU, exact match, token F1, the
house rules, the stop rate and length; label accuracy/F1 and JSON validity when the task calls
for them. Every difference between two models comes with a paired bootstrap interval over the
same examples. A general-ability check (forgetting) and an optional LLM judge complete it.

``04_evaluate.json`` keys: ``base``/``prompted``/``tuned`` (each: ``loss``, ``perplexity``, ``tokens``,
``rougeL``, ``chrF``, ``bleu``, ``exact_match``, ``token_f1``, ``rule_pass_rate``, ``stop_rate``,
``mean_new_tokens``, ``length`` {tokens, words: mean/median/p90/max}, ``ci`` {metric: value, ci_low,
ci_high}, and ``accuracy``/``macro_f1``/``confusion_matrix`` for labels or ``json_valid_rate`` for
JSON); ``deltas`` {``tuned_vs_base``, ``tuned_vs_prompted``, ``prompted_vs_base``: {metric: delta,
ci_low, ci_high}}; ``verdict`` (sentences); ``forgetting``; ``overfitting``; ``judge`` (when on);
``reference`` (the references' own rule pass rate and length: the ceiling); ``task``, ``test_examples``,
``eval_budget`` (the rows read and why, the estimates: :mod:`ftkit.core.eval_budget`), ``interval_note``
(the loss interval those rows bought), ``generations``, ``few_shot_ids``, ``stop_token_ids``, ``seconds``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

from ftkit.core.eval_budget import plan_rows, width_note
from ftkit.core.files import iter_jsonl
from ftkit.core.formats import prompt_and_reference
from ftkit.core.masking import IGNORE_INDEX, TemplateError
from ftkit.core.progress import Progress
from ftkit.evaluate.forgetting import forgetting_check
from ftkit.evaluate.loss import example_losses, summarise_loss
from ftkit.evaluate.metrics import (
    Sample,
    infer_task,
    length_stats,
)
from ftkit.evaluate.preference_eval import evaluate_preferences, starting_adapter, test_pairs
from ftkit.evaluate.prompting import Prompting, choose_shots, prompted_row
from ftkit.evaluate.replies import generate_with_progress
from ftkit.evaluate.rules import check_rules, has_rules
from ftkit.evaluate.scoring import MODELS, compare_models, score_generations, verdict

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- loss


# ----------------------------------------------------------------------------- prompting


# ----------------------------------------------------------------------------- generation


# ----------------------------------------------------------------------------- house rules


# ----------------------------------------------------------------------------- scoring


def _s(seconds: float | None) -> str:
    return "?" if seconds is None else f"~{seconds:.0f}"


def adapter_disabled(model):
    """Context manager: the base model's behaviour (a no-op for a model without adapters)."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


# ----------------------------------------------------------------------------- forgetting


# ----------------------------------------------------------------------------- the stage

def evaluate_run(cfg, paths) -> dict:
    """Run stage 04; writes per-example generations; returns the metrics for ``04_evaluate.json``."""
    from ftkit.core.files import write_jsonl
    from ftkit.core.modeling import load_model, resolve_model_path, stop_token_ids
    from ftkit.core.trained import load_adapter_model, trained_info

    started = time.perf_counter()
    e = cfg.evaluate
    model, tok = load_adapter_model(cfg, paths)
    info = trained_info(paths)
    full = info.get("method") == "full"
    base_model = load_model(resolve_model_path(cfg.model.name), cfg.model) if full else model

    def base_ctx():
        return contextlib.nullcontext() if full else adapter_disabled(model)

    stop_ids = stop_token_ids(tok)
    chat_path = paths.require(paths.chat("test"), "02_format_conversion")
    tokens_path = paths.require(paths.tokens("test"), "02_format_conversion")
    completion = info.get("objective") == "completion"

    train_metrics = paths.read_metrics("03_train") if paths.metrics("03_train").exists() else {}
    budget = plan_rows(e, info.get("method", "lora"), [len(r["input_ids"]) for r in iter_jsonl(tokens_path)],
                       train_metrics.get("tokens_per_second"), train_metrics.get("runtime_s"))
    log.info("04_evaluate: %s (estimated: loss passes %s s, generations %s s)", budget.reason,
             _s(budget.est_loss_s), _s(budget.est_generation_s))

    def token_rows() -> Iterator[dict]:
        for i, r in enumerate(iter_jsonl(tokens_path)):
            if i >= budget.rows:
                return
            labels = [IGNORE_INDEX] + r["input_ids"][1:] if completion else r["labels"]
            yield {"input_ids": r["input_ids"], "labels": labels}

    shots, shot_ids = choose_shots(paths.chat("train"), e.prompting.few_shot, cfg.seed) \
        if paths.chat("train").exists() else ([], [])
    prompting = Prompting(e.prompting.system_prompt, shots, shot_ids)
    few_shot_note = None
    first = next((r for r in iter_jsonl(chat_path) if "messages" in r), None)
    if shots and first is not None:
        try:
            prompted_row(tok, first["messages"], prompting)
        except (TemplateError, ValueError) as err:  # templates that rewrite earlier turns (Qwen3's reasoning)
            few_shot_note = f"few-shot examples left out of the prompted baseline: {err}"
            log.warning(few_shot_note)
            shots, shot_ids = [], []
            prompting = Prompting(e.prompting.system_prompt, shots, shot_ids)

    def prompted_rows() -> Iterator[dict]:
        for i, r in enumerate(iter_jsonl(chat_path)):
            if i >= budget.rows:
                return
            yield prompted_row(tok, r["messages"], prompting)

    # the generation sample: the first num_generations test conversations that have a prompt
    sample = []
    for r in iter_jsonl(chat_path):
        if len(sample) == e.num_generations:
            break
        if "messages" in r:
            sample.append(r)
    chat_data = bool(sample)
    prompts = [prompt_and_reference(r["messages"])[0] for r in sample]
    refs = [prompt_and_reference(r["messages"])[1] for r in sample]
    prompt_texts = ["\n".join(m["content"] for m in p if m["role"] == "user") for p in prompts]
    task = e.task if e.task != "auto" else infer_task(refs)
    gen_kw = {"max_new_tokens": e.max_new_tokens, "batch_size": e.generation_batch_size, "stop_ids": stop_ids,
              "do_sample": e.do_sample, "temperature": e.temperature, "top_p": e.top_p, "seed": cfg.seed}

    test_rows = budget.rows  # the progress lines' total
    results, samples, per_rows, seconds = {}, {}, {}, {}
    init_adapter = info.get("init_adapter") if not full else None
    names = [n for n in MODELS if (chat_data or n in ("base", "tuned")) and (n != "sft" or init_adapter)]
    for name in names:
        t0 = time.perf_counter()
        m = model if name in ("tuned", "sft") else base_model
        ctx = contextlib.nullcontext() if name == "tuned" else starting_adapter(model, init_adapter) if name == "sft" \
            else base_ctx()
        with ctx:
            rows = prompted_rows() if name == "prompted" else token_rows()
            with Progress(f"04_evaluate: {name} loss", test_rows, unit="rows") as progress:
                sums, counts = example_losses(m, rows, tok.pad_token_id, e.batch_size, progress=progress)
            model_prompts = [prompting.apply(p) for p in prompts] if name == "prompted" else prompts
            gens = generate_with_progress(f"04_evaluate: {name}", m, tok, model_prompts, **gen_kw) \
                if chat_data else []
        agg, per, per_rows[name] = score_generations(prompt_texts, refs, gens, e.rules, task)
        results[name] = {**summarise_loss(sums, counts), **agg}
        samples[name] = {"loss": Sample.of(sums, counts), **{k: Sample.of(v) for k, v in per.items()}}
        seconds[name] = time.perf_counter() - t0

    # the references through the same rules: the ceiling a model that writes like the data would reach
    reference = {"rule_pass_rate": (sum(check_rules(r, q, e.rules).passed for r, q in zip(refs, prompt_texts, strict=True))
                                    / max(len(refs), 1)) if has_rules(e.rules) else None,
                 "length": {"words": length_stats([float(len(r.split())) for r in refs])}}
    cis, deltas = compare_models(samples, e.bootstrap_samples, e.confidence, cfg.seed)
    for name in results:
        results[name]["ci"] = cis[name]

    write_jsonl(paths.generations, [
        {"prompt": p[-1]["content"], "reference": ref,
         **{n: per_rows[n][i]["text"] for n in per_rows},
         **{f"{n}_rules": per_rows[n][i]["rule_failures"] for n in per_rows},
         **{f"{n}_stopped": per_rows[n][i]["stopped"] for n in per_rows}}
        for i, (p, ref) in enumerate(zip(prompts, refs, strict=True))
    ])

    t0 = time.perf_counter()
    forgetting = forgetting_check(cfg, tok, base_ctx, model, base_model, stop_ids)
    seconds["forgetting"] = time.perf_counter() - t0

    preference = None
    pairs = test_pairs(tokens_path, budget.rows)
    if pairs:  # preference data: the held-out pairs ranked by the tuned model against the reference
        t0 = time.perf_counter()
        ref_arm = (model, lambda: starting_adapter(model, init_adapter)) if init_adapter else (base_model, base_ctx)
        preference = evaluate_preferences(
            model, pairs, reference=ref_arm, beta=cfg.train.preference.beta,
            reference_name="the adapter training started from (train.init_adapter)" if init_adapter else "the base model",
            pad_token_id=tok.pad_token_id, batch_size=e.batch_size, resamples=e.bootstrap_samples,
            confidence=e.confidence, seed=cfg.seed)
        preference["objective"] = info.get("objective", "instruction")
        seconds["preference"] = time.perf_counter() - t0

    judge = None
    if e.judge.enabled and chat_data:
        from ftkit.evaluate.judge import build_judge, compare

        t0 = time.perf_counter()
        jdg = build_judge(cfg)
        n = min(e.judge.max_pairs, len(sample))
        judge = {}
        for rival in (r for r in ("base", "prompted", "sft") if r in per_rows):
            items = [{"prompt": prompt_texts[i], "reference": refs[i], "first": per_rows["tuned"][i]["text"],
                      "second": per_rows[rival][i]["text"]} for i in range(n)]
            judge[f"tuned_vs_{rival}"] = compare(jdg, items, resamples=e.bootstrap_samples,
                                                 confidence=e.confidence, seed=cfg.seed)
        seconds["judge"] = time.perf_counter() - t0

    overfitting = None
    if paths.metrics("03_train").exists():
        overfitting = paths.read_metrics("03_train").get("overfitting")
    seconds["total"] = time.perf_counter() - started
    return {
        **results,
        "reference": reference,
        "deltas": deltas,
        "verdict": verdict(deltas, e.confidence, info.get("objective", "instruction")),
        "loss_reduction": 1 - results["tuned"]["loss"] / results["base"]["loss"],
        "forgetting": forgetting,
        "preference": preference,
        "overfitting": overfitting,
        "judge": judge,
        "task": task,
        "test_examples": len(samples["tuned"]["loss"].values),
        "eval_budget": budget.to_dict(),
        "interval_note": width_note(budget, deltas.get("tuned_vs_base", {}).get("loss"), e.confidence),
        "generations": len(sample),
        "few_shot_ids": shot_ids, "few_shot_note": few_shot_note,
        "prompted_system_prompt": e.prompting.system_prompt,
        "confidence": e.confidence,
        "bootstrap_samples": e.bootstrap_samples,
        "stop_token_ids": stop_ids,
        "seconds": seconds,
    }
