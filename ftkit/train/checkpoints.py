"""Checkpoints a resume can trust: a marker written only after a checkpoint is complete, so a torn
checkpoint (a kill mid-write) is never loaded."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import TrainerCallback

from ftkit.core.files import write_json

log = logging.getLogger(__name__)


COMPLETE_MARKER = "ftkit_checkpoint_complete.json"


class CompleteCheckpointMarker(TrainerCallback):
    """Writes a marker into each checkpoint after the Trainer finished writing it (atomically),
    so a checkpoint torn by a crash or SIGKILL mid-write is recognised and never resumed from."""

    def on_save(self, args, state, control, **kwargs):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.is_dir() and state.is_world_process_zero:
            write_json(ckpt / COMPLETE_MARKER, {"global_step": state.global_step, "files": sorted(
                p.name for p in ckpt.iterdir())})
        return control


def find_resume_checkpoint(checkpoints_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: the newest complete one (``auto``), none, or a given path."""
    if resume == "never":
        return None
    if resume != "auto":
        p = Path(resume)
        if not (p / COMPLETE_MARKER).exists():
            raise FileNotFoundError(f"train.resume: {p} is not a complete ftkit checkpoint (no {COMPLETE_MARKER})")
        return p
    if not checkpoints_dir.is_dir():
        return None
    found = sorted((d for d in checkpoints_dir.glob("checkpoint-*") if d.name.split("-")[-1].isdigit()),
                   key=lambda d: int(d.name.split("-")[-1]), reverse=True)
    for d in found:
        if (d / COMPLETE_MARKER).exists():
            return d
        log.warning("skipping torn checkpoint %s (no %s: it was not finished being written)", d, COMPLETE_MARKER)
    return None
