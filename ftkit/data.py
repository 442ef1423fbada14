"""Stage 01: load a raw export, clean it, group conversations and split them.

Nothing is dropped silently: every row that is not kept goes to the quarantine file with its
source (file and row) and the reason, and ``rows_in == rows_kept + rows_quarantined``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from . import demo_data
from .config import DEMO_DATA, DataConfig
from .paths import RunPaths, write_jsonl

log = logging.getLogger("ftkit")

_SPACES = re.compile(r"[ \t\u00a0]+")


@dataclass
class PrepResult:
    """What stage 01 did, for the report and the metrics file."""

    source: str
    rows_in: int
    rows_kept: int
    quarantined: list[dict] = field(default_factory=list)
    whitespace_fixed: int = 0
    splits: dict[str, list[dict]] = field(default_factory=dict)

    def metrics(self) -> dict:
        reasons: dict[str, int] = {}
        for q in self.quarantined:
            reasons[q["reason_code"]] = reasons.get(q["reason_code"], 0) + 1
        return {
            "source": self.source,
            "rows_in": self.rows_in,
            "rows_kept": self.rows_kept,
            "rows_quarantined": len(self.quarantined),
            "quarantine_reasons": reasons,
            "whitespace_fixed": self.whitespace_fixed,
            "conversations": {k: len(v) for k, v in self.splits.items()},
            "rows": {k: sum(len(c.get("turns", [c])) for c in v) for k, v in self.splits.items()},
        }


def resolve_source(cfg: DataConfig, paths: RunPaths, seed: int) -> Path:
    """The raw file to read: the user's ``data.path`` or the demo export, generated on demand."""
    if cfg.path == DEMO_DATA:
        return demo_data.write_csv(paths.raw_demo, n=cfg.demo_size, seed=seed)
    p = Path(cfg.path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"data.path: {p} does not exist; point data.path at a CSV/TSV/JSONL file or use 'demo'")
    return p


def read_rows(path: Path) -> list[tuple[str, dict]]:
    """Read a CSV, TSV or JSONL table as ``(where, row)`` pairs; ``where`` is ``file:row N``/``file:line N``."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            return [(f"{path}:row {i}", dict(r)) for i, r in enumerate(reader, 1)]
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        with open(path, encoding="utf-8-sig") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    obj = {"__invalid__": f"invalid JSON ({e.msg} at column {e.colno})"}
                rows.append((f"{path}:line {i}", obj if isinstance(obj, dict) else {"__invalid__": "not a JSON object"}))
        return rows
    raise ValueError(f"{path}: unsupported file type '{suffix}'; use .csv, .tsv or .jsonl")


def normalise_text(text: str) -> str:
    """Unicode NFC, unified newlines, runs of spaces collapsed, lines stripped."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return "\n".join(lines).strip()


def prepare(cfg: DataConfig, paths: RunPaths, seed: int) -> PrepResult:
    """Run stage 01 end to end and write the splits and the quarantine file."""
    source = resolve_source(cfg, paths, seed)
    rows = read_rows(source)
    result = PrepResult(source=str(source), rows_in=len(rows), rows_kept=0)
    conversations: dict[str, list[dict]] = {}
    chat_records: list[dict] = []  # rows already in chat form
    seen: dict[object, str] = {}

    def quarantine(where: str, row: dict, code: str, reason: str) -> None:
        result.quarantined.append({"source": where, "reason_code": code, "reason": reason, "record": row})

    for where, row in rows:
        if "__invalid__" in row:
            quarantine(where, row, "invalid_record", row["__invalid__"])
            continue
        if "messages" in row:  # already in chat form (OpenAI fine-tuning JSONL)
            key = json.dumps(row["messages"], sort_keys=True)
            if key in seen:
                quarantine(where, row, "duplicate", f"exact duplicate of {seen[key]}")
                continue
            seen[key] = where
            chat_records.append({"conversation_id": where, "messages": row["messages"], "source": where})
            result.rows_kept += 1
            continue
        missing = [c for c in (cfg.user_column, cfg.assistant_column) if c not in row]
        if missing:
            quarantine(where, row, "missing_field",
                       f"no column {missing[0]!r}; set data.user_column/data.assistant_column to this file's columns "
                       f"(it has: {', '.join(row)})")
            continue
        user_raw, asst_raw = row[cfg.user_column], row[cfg.assistant_column]
        if not isinstance(user_raw, str) or not isinstance(asst_raw, str):
            quarantine(where, row, "wrong_type", f"{cfg.user_column}/{cfg.assistant_column} must be text")
            continue
        user, asst = normalise_text(user_raw), normalise_text(asst_raw)
        if (user, asst) != (user_raw, asst_raw):
            result.whitespace_fixed += 1
        if not user or not asst:
            empty = cfg.user_column if not user else cfg.assistant_column
            quarantine(where, row, "empty_content", f"field {empty!r} is empty or whitespace only")
            continue
        cid = str(row.get(cfg.conversation_column, "") or "") if cfg.conversation_column else ""
        turn_raw = row.get(cfg.turn_column, 1) if cfg.turn_column else 1
        try:
            turn = int(turn_raw or 1)
        except (TypeError, ValueError):
            quarantine(where, row, "wrong_type", f"field {cfg.turn_column!r} must be an integer, got {turn_raw!r}")
            continue
        key = (cid, turn, user, asst)
        if key in seen:
            quarantine(where, row, "duplicate", f"exact duplicate of {seen[key]}")
            continue
        seen[key] = where
        conversations.setdefault(cid or where, []).append({"turn": turn, "user": user, "assistant": asst, "source": where})
        result.rows_kept += 1

    convs = [{"conversation_id": cid, "turns": sorted(turns, key=lambda t: t.get("turn", 0))}
             for cid, turns in conversations.items()] + chat_records
    if cfg.max_records is not None:
        for c in convs[cfg.max_records:]:
            for t in c.get("turns", [c]):
                quarantine(t["source"], t, "over_max_records", f"beyond data.max_records={cfg.max_records}")
                result.rows_kept -= 1
        convs = convs[: cfg.max_records]
    result.splits = split_conversations(convs, cfg.val_fraction, cfg.test_fraction, seed)
    for name, items in result.splits.items():
        write_jsonl(paths.split(name), items)
    write_jsonl(paths.quarantine, result.quarantined)
    assert result.rows_in == result.rows_kept + len(result.quarantined), "row accounting is off"
    return result


def split_conversations(convs: list[dict], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[dict]]:
    """Split whole conversations (never their turns) into train/val/test with a seeded shuffle."""
    order = sorted(convs, key=lambda c: c["conversation_id"])
    random.Random(seed).shuffle(order)
    n = len(order)
    n_test, n_val = round(n * test_fraction), round(n * val_fraction)
    return {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
