"""Stage 02: splits → validated chat records → tokenised examples with assistant-only labels."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from .config import ExperimentConfig
from .formats import to_messages, validate
from .masking import Example, build_example
from .paths import RunPaths, read_jsonl, write_jsonl

log = logging.getLogger("ftkit")
SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """A record that the configuration says must stop the run."""


@dataclass
class ConversionResult:
    records_in: dict[str, int] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)
    quarantined: list[dict] = field(default_factory=list)
    lengths: dict[str, list[int]] = field(default_factory=dict)
    trained_tokens: dict[str, int] = field(default_factory=dict)
    total_tokens: dict[str, int] = field(default_factory=dict)
    example: Example | None = None

    def metrics(self, max_seq_len: int) -> dict:
        reasons: dict[str, int] = {}
        for q in self.quarantined:
            reasons[q["reason_code"]] = reasons.get(q["reason_code"], 0) + 1
        stats = {}
        for name, lens in self.lengths.items():
            arr = np.array(lens or [0])
            stats[name] = {
                "examples": len(lens), "tokens": int(arr.sum()), "mean": float(arr.mean()),
                "p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)), "max": int(arr.max()),
                "trained_token_share": self.trained_tokens[name] / max(self.total_tokens[name], 1),
            }
        return {
            "records_in": self.records_in, "kept": self.kept, "quarantined": len(self.quarantined),
            "quarantine_reasons": reasons, "max_seq_len": max_seq_len, "token_stats": stats,
        }


def convert(cfg: ExperimentConfig, paths: RunPaths, tokenizer) -> ConversionResult:
    """Run stage 02 for all splits and write chat and token files plus the quarantine file."""
    c = cfg.convert
    out = ConversionResult()
    for name in SPLITS:
        convs = read_jsonl(paths.require(paths.split(name), "01_data_prep"))
        out.records_in[name] = len(convs)
        chat_rows, token_rows, lens = [], [], []
        out.trained_tokens[name] = out.total_tokens[name] = 0
        for i, conv in enumerate(convs, 1):
            where = f"{paths.split(name)}:line {i} (conversation {conv.get('conversation_id')})"
            record = to_messages(conv, c.system_prompt)
            problems = validate(record)
            if problems:
                out.quarantined.append({"source": where, "reason_code": "invalid_messages",
                                        "reason": "; ".join(problems), "record": record})
                continue
            ex = build_example(tokenizer, record["messages"])
            if len(ex.input_ids) > c.max_seq_len:
                reason = (f"{len(ex.input_ids)} tokens > convert.max_seq_len={c.max_seq_len}; raise max_seq_len, "
                          "shorten the conversation, or set convert.over_length: drop")
                if c.over_length == "error":
                    raise DataError(f"{where}: {reason}")
                out.quarantined.append({"source": where, "reason_code": "over_length", "reason": reason, "record": record})
                continue
            if ex.n_trained == 0:
                out.quarantined.append({"source": where, "reason_code": "no_trained_tokens",
                                        "reason": "no assistant token survived masking", "record": record})
                continue
            chat_rows.append(record)
            token_rows.append({"conversation_id": record["conversation_id"], **ex.to_dict()})
            lens.append(len(ex.input_ids))
            out.trained_tokens[name] += ex.n_trained
            out.total_tokens[name] += len(ex.input_ids)
            if out.example is None and name == "train" and len(record["messages"]) > 3:
                out.example = ex
        if out.example is None and token_rows and name == "train":
            out.example = Example(token_rows[0]["input_ids"], token_rows[0]["labels"])
        write_jsonl(paths.chat(name), chat_rows)
        write_jsonl(paths.tokens(name), token_rows)
        out.kept[name] = len(chat_rows)
        out.lengths[name] = lens
    write_jsonl(paths.format_quarantine, out.quarantined)
    return out
