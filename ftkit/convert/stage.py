"""Stage 02 as one call: the splits rendered with the chat template, masked and tokenised (``run``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ftkit.convert.conversion import ConversionResult, convert, run_tokenizer
from ftkit.core.config import ExperimentConfig
from ftkit.core.paths import RunPaths

STAGE = "02_format_conversion"


@dataclass
class ConvertResult:
    tokenizer: Any
    conversion: ConversionResult  # examples, lengths, quarantine per split
    estimate: Any  # ftkit.core.estimate.Estimate: memory and time to plan stage 03 with
    metrics: dict  # what metrics/02_format_conversion.json holds


def run(cfg: ExperimentConfig, paths: RunPaths) -> ConvertResult:
    """Stage 02: ``formatted/*.tokens.jsonl`` and the metrics, with the pre-flight estimate for stage 03."""
    from ftkit.core import estimate
    from ftkit.core.masking import end_of_turn_token_id

    with paths.stage(STAGE, after="01_data_prep"):  # never the splits of a stage 01 that was killed midway
        tokenizer = run_tokenizer(cfg, paths)
        result = convert(cfg, paths, tokenizer)
        metrics = result.metrics(cfg.convert.max_seq_len)
        metrics["end_of_turn_token"] = tokenizer.decode(end_of_turn_token_id(tokenizer))
        metrics["pad_token"] = tokenizer.pad_token
        est = estimate.for_run(cfg, result)
        metrics["estimate"] = est.to_dict()
        from ftkit.core.eval_budget import before_training

        metrics["estimate_evaluate"] = before_training(cfg, result.lengths["test"], est.train_tokens,
                                                       est.est_train_seconds).to_dict()
        paths.write_metrics(STAGE, metrics)
        splits = ("train", "val", "test")
        paths.finish(STAGE, [*map(paths.tokens, splits), *map(paths.chat, splits), *map(paths.openai_export, splits),
                             paths.format_quarantine, paths.tokenizer_dir], after="01_data_prep")
    return ConvertResult(tokenizer, result, est, metrics)
