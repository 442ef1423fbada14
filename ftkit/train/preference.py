"""Preference tuning in stage 03: TRL's DPOTrainer, KTOTrainer and ORPOTrainer on the rows stage 02 tokenised.

The model is the one stage 03 trains anyway (LoRA, QLoRA or DoRA on the device plan's base); TRL
takes the reference from the same weights: with a new adapter, a frozen copy of it, initialised as it
is, so the reference is the base model (the adapter's B matrices are zero); with ``train.init_adapter``,
a frozen copy of that adapter; a fully trained model (``method: full``) gets its reference log-probabilities
computed once before training. No second model is loaded. ORPO needs no reference.

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
    """The rows a preference objective trains on: pairs for DPO and ORPO; for KTO, labelled replies as they
    are and each pair as two (chosen: good, rejected: bad), which is how TRL unpairs a pair file."""
    out = []
    for r in rows:
        if objective in ("dpo", "orpo") and "rejected_ids" in r:
            out.append({k: r[k] for k in PAIR_KEYS})
        elif objective == "kto" and "completion_ids" in r:
            out.append({k: r[k] for k in KTO_KEYS})
        elif objective == "kto" and "rejected_ids" in r:
            out += [{"prompt_ids": r["prompt_ids"], "completion_ids": r["chosen_ids"], "label": True},
                    {"prompt_ids": r["prompt_ids"], "completion_ids": r["rejected_ids"], "label": False}]
    return out


def need_preference_data(rows: list[dict], objective: str, where: str) -> None:
    if not rows:
        what = "chosen/rejected pairs" if objective != "kto" else "replies labelled good or bad (or pairs)"
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


def pretokenised_orpo(trainer_class):
    """TRL's ORPOTrainer on stage 02's token ids, its language-model term over the chosen reply only.

    TRL's ORPO tokenises the rows itself (in ``tokenize_row``: the same template-rendering and eos concerns as
    above) and takes its language-model loss over prompt and reply together; the paper's loss, like stage 03's
    instruction objective, is over the reply. Both are replaced here; the odds-ratio term is TRL's."""
    import torch.nn.functional as F

    from ftkit.core.masking import IGNORE_INDEX

    class PretokenisedORPO(trainer_class):
        def tokenize_row(self, feature, model=None):
            prompt = list(feature["prompt_ids"])
            row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
            for k in ("chosen", "rejected"):
                reply = list(feature[f"{k}_ids"])
                row[f"{k}_input_ids"] = prompt + reply
                row[f"{k}_attention_mask"] = [1] * (len(prompt) + len(reply))
                row[f"{k}_labels"] = [IGNORE_INDEX] * len(prompt) + reply
            return row

        def _track_num_input_tokens(self, inputs):
            # the Trainer counts ``input_ids``; ORPO's batches hold the chosen and the rejected sequences
            if self.args.include_num_input_tokens_seen not in ("no", False):
                import torch

                n = torch.tensor(inputs["chosen_input_ids"].numel() + inputs["rejected_input_ids"].numel(),
                                 device=self.args.device)
                self.state.num_input_tokens_seen += int(self.accelerator.gather(n).sum())

        def concatenated_forward(self, model, batch):
            out = super().concatenated_forward(model, batch)
            logits = out[2]  # the chosen rows' logits, the last position dropped
            labels = batch["chosen_labels"][:, 1:]
            labels = F.pad(labels, (0, logits.shape[1] - labels.shape[1]), value=IGNORE_INDEX).to(logits.device)
            nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
            return (*out[:4], nll, *out[5:])

    return PretokenisedORPO


def build_preference_trainer(cfg, paths, model, tokenizer, train_rows, val_rows, plan, recipe=None):
    """A TRL trainer for ``cfg.train.objective`` (dpo, kto or orpo) with stage 03's arguments; ``recipe``'s
    ``trainer`` hook sees it last, as for supervised training."""
    from ftkit.train.recipe import DEFAULT
    from ftkit.train.trainer import callbacks, planned_warmup, quiet_when_headless, training_arguments

    t, p = cfg.train, cfg.train.preference
    kwargs = training_arguments(cfg, paths, model, bool(val_rows), plan)
    kwargs.pop("neftune_noise_alpha", None)  # noise on the embeddings would make policy and reference disagree
    # a fully trained model has no adapter to switch off: its reference log-probabilities are computed once,
    # before the first step, from the weights as they start (no second copy of the model in memory)
    common = dict(beta=p.beta, max_length=None, dataset_num_proc=None)
    reference = dict(precompute_ref_log_probs=t.method == "full")
    if t.objective == "orpo":
        import warnings

        with warnings.catch_warnings():  # trl.experimental: pinned to the minor release tested (pyproject)
            warnings.simplefilter("ignore")
            from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        longest = max(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"]))
                      for r in [*train_rows, *val_rows])
        args = ORPOConfig(**kwargs, **{**common, "max_length": longest})  # stage 02 quarantined the longer ones
        trainer_class = pretokenised_orpo(ORPOTrainer)
    elif t.objective == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(**kwargs, **common, **reference, loss_type=list(p.loss_type), label_smoothing=p.label_smoothing)
        trainer_class = pretokenised(DPOTrainer)
    else:
        from trl import KTOConfig, KTOTrainer

        from ftkit.core.config import kto_loss

        loss = kto_loss(p)
        # KTO's KL term pairs each reply with its neighbour's prompt in a fixed order: the rows are
        # shuffled here, seeded, and read in order
        kwargs["train_sampling_strategy"] = "sequential"
        kwargs.pop("group_by_length", None)
        args = KTOConfig(**kwargs, **common, **reference, loss_type=loss, desirable_weight=p.desirable_weight,
                         undesirable_weight=p.undesirable_weight)
        train_rows = list(train_rows)
        random.Random(cfg.seed).shuffle(train_rows)
        if loss == "kto":
            train_rows = _with_kl_completions(train_rows, args.per_device_train_batch_size)
            val_rows = _with_kl_completions(val_rows, args.per_device_eval_batch_size) if val_rows else val_rows
        trainer_class = pretokenised(KTOTrainer)
    args.warmup_steps = planned_warmup(cfg, len(train_rows), plan, args.world_size)
    from datasets import Dataset

    extra = {} if t.objective == "orpo" else {"ref_model": None}
    trainer = trainer_class(
        model=model, args=args, processing_class=tokenizer, callbacks=callbacks(cfg), **extra,
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
