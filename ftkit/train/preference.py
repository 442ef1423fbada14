"""Preference tuning in stage 03: TRL's DPOTrainer and KTOTrainer on the rows stage 02 tokenised.

The model is the one stage 03 trains anyway (LoRA, QLoRA or DoRA on the device plan's base); TRL
takes the reference from the same weights: with a new adapter, a frozen copy of it, initialised as it
is, so the reference is the base model (the adapter's B matrices are zero); with ``train.init_adapter``,
a frozen copy of that adapter. No second model is loaded.

Stage 02 has already rendered every prompt and reply with the chat template that serving uses and cut
them into ``prompt_ids``/``chosen_ids``/``rejected_ids`` (KTO: ``completion_ids`` and ``label``), each reply
ending with the end-of-turn token, over-long pairs quarantined. TRL's own tokenisation would render the
template again (a second chance for train and serve to differ), append ``eos_token`` (not every template's
end of turn) and drop over-long prompts without a count, so its dataset preparation is replaced by
a pass-through (``_prepare_dataset``) that keeps only the keys its collators read.
"""

from __future__ import annotations

import random

PAIR_KEYS = ("prompt_ids", "chosen_ids", "rejected_ids")
KTO_KEYS = ("prompt_ids", "completion_ids", "label")


def preference_rows(rows: list[dict], objective: str) -> list[dict]:
    """The rows a preference objective trains on: pairs for DPO; for KTO, labelled replies as they are and
    each pair as two (chosen: good, rejected: bad), which is how TRL unpairs a pair file."""
    out = []
    for r in rows:
        if objective == "dpo" and "rejected_ids" in r:
            out.append({k: r[k] for k in PAIR_KEYS})
        elif objective == "kto" and "completion_ids" in r:
            out.append({k: r[k] for k in KTO_KEYS})
        elif objective == "kto" and "rejected_ids" in r:
            out += [{"prompt_ids": r["prompt_ids"], "completion_ids": r["chosen_ids"], "label": True},
                    {"prompt_ids": r["prompt_ids"], "completion_ids": r["rejected_ids"], "label": False}]
    return out


def need_preference_data(rows: list[dict], objective: str, where: str) -> None:
    if not rows:
        what = "chosen/rejected pairs" if objective == "dpo" else "replies labelled good or bad (or pairs)"
        raise ValueError(f"{where}: train.objective: {objective} needs {what}, and stage 02 wrote none; give "
                         "preference data (data.format: openai_dpo, preference or kto) or set train.objective: "
                         "instruction")


def pretokenised(trainer_class):
    """``trainer_class`` (a TRL trainer) taking rows that are already token ids, as stage 02 wrote them."""

    class Pretokenised(trainer_class):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    Pretokenised.__name__ = f"Pretokenised{trainer_class.__name__}"
    return Pretokenised


def build_preference_trainer(cfg, paths, model, tokenizer, train_rows, val_rows, plan, recipe=None):
    """A TRL trainer for ``cfg.train.objective`` (dpo or kto) with stage 03's arguments; ``recipe``'s
    ``trainer`` hook sees it last, as for supervised training."""
    from ftkit.train.recipe import DEFAULT
    from ftkit.train.trainer import callbacks, planned_warmup, quiet_when_headless, training_arguments

    t, p = cfg.train, cfg.train.preference
    kwargs = training_arguments(cfg, paths, model, bool(val_rows), plan)
    kwargs.pop("neftune_noise_alpha", None)  # noise on the embeddings would make policy and reference disagree
    common = dict(beta=p.beta, max_length=None, precompute_ref_log_probs=False, dataset_num_proc=None)
    if t.objective == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(**kwargs, **common, loss_type=list(p.loss_type), label_smoothing=p.label_smoothing)
        trainer_class = DPOTrainer
    else:
        from trl import KTOConfig, KTOTrainer

        from ftkit.core.config import kto_loss

        loss = kto_loss(p)
        # KTO's KL term pairs each reply with its neighbour's prompt in a fixed order: the rows are
        # shuffled here, seeded, and read in order
        kwargs["train_sampling_strategy"] = "sequential"
        kwargs.pop("group_by_length", None)
        args = KTOConfig(**kwargs, **common, loss_type=loss, desirable_weight=p.desirable_weight,
                         undesirable_weight=p.undesirable_weight)
        train_rows = list(train_rows)
        random.Random(cfg.seed).shuffle(train_rows)
        if loss == "kto":
            train_rows = _with_kl_completions(train_rows, args.per_device_train_batch_size)
            val_rows = _with_kl_completions(val_rows, args.per_device_eval_batch_size) if val_rows else val_rows
        trainer_class = KTOTrainer
    args.warmup_steps = planned_warmup(cfg, len(train_rows), plan, args.world_size)
    from datasets import Dataset

    trainer = pretokenised(trainer_class)(
        model=model, ref_model=None, args=args, processing_class=tokenizer, callbacks=callbacks(cfg),
        train_dataset=Dataset.from_list(train_rows), eval_dataset=Dataset.from_list(val_rows) if val_rows else None)
    return (recipe or DEFAULT).trainer(quiet_when_headless(trainer))


def _with_kl_completions(rows: list[dict], batch: int) -> list[dict]:
    """KTO's KL estimate: each row's completion shifted by one within its batch (its neighbour's reply to this
    prompt), as TRL's own dataset preparation does."""
    out = []
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        shifted = [chunk[-1]["completion_ids"]] + [r["completion_ids"] for r in chunk[:-1]]
        out += [{**r, "KL_completion_ids": k} for r, k in zip(chunk, shifted, strict=True)]
    return out
