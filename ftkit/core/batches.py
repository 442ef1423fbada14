"""Batches of stage 02's token rows for training and evaluation: padding that never trains a pad, packing,
and the trained-positions hint that lets a model compute logits only where the loss needs them.

The collator only pads (labels with -100, never by token id, so EOS stays trained even where pad == EOS)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ftkit.core.masking import IGNORE_INDEX
from ftkit.core.modeling import (
    forward_params,
)


class TokenizedDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


@dataclass
class PadCollator:
    """Right-pad a batch to its longest example; labels are padded with -100."""

    pad_token_id: int

    def __call__(self, batch: list[dict]) -> dict:
        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            labels[i, :k] = torch.tensor(b["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def make_collator(pad_token_id: int, packing: bool, boundaries: bool = False, trained_logits_only: bool = False):
    """Padding-free packing (transformers' DataCollatorWithFlattening) or right padding.

    ``boundaries``: also hand the model each packed example's start (``cu_seq_lens_q/k``) and the
    longest example's length, computed here on the host, so the varlen attention needs no device sync.
    ``trained_logits_only``: see :class:`TrainedPositions` (packing only).
    """
    if packing:
        from transformers import DataCollatorWithFlattening

        flat = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX,
                                          return_flash_attn_kwargs=boundaries)
        return TrainedPositions(flat) if trained_logits_only else flat
    return PadCollator(pad_token_id)


@dataclass
class TrainedPositions:
    """Wraps a packing collator so the model computes logits only where they are trained.

    Adds ``logits_to_keep``: the positions of the packed row whose next token is trained, and
    ``shift_labels``: those next tokens. A transformers causal LM then applies its LM head to those
    positions alone and its loss takes ``shift_labels`` as the targets: the same loss, summed over
    the same tokens (the Trainer counts them from ``shift_labels`` or ``labels``, which agree), without
    the head's product and the softmax over the prompts' positions. A micro-batch with no trained
    token keeps one position with no target (its loss adds 0)."""

    collator: object

    def __call__(self, features: list[dict]) -> dict:
        batch = self.collator(features)
        labels = batch["labels"]
        if labels.shape[0] != 1:
            return batch
        targets = labels[0, 1:]
        keep = (targets != IGNORE_INDEX).nonzero().reshape(-1)
        if keep.numel() == 0:
            keep = torch.zeros(1, dtype=torch.long)
        batch["logits_to_keep"] = keep
        batch["shift_labels"] = targets[keep].unsqueeze(0)
        return batch


def takes_logit_positions(model) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (which transformers' causal LMs accept
    as a tensor of positions)."""
    return "logits_to_keep" in forward_params(model)
