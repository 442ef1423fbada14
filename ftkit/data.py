"""Stage 01: read any supported input, convert to canonical chat records, clean, split.

Order of work: read (streamed) → detect the format → convert each record → normalise text,
count/scrub PII, handle ``{{placeholders}}`` → drop exact duplicate rows → group rows into
conversations (``data.conversation_column``) → validate → length filter → near-duplicates →
split (seeded; stratified by ``data.label_column``; grouped by ``data.group_column``) → leakage
check across splits.

Nothing is dropped silently: every input row that is not kept is written to the quarantine file
with its source (file and line/row), a reason code and a reason a person understands, and
``rows_in == rows_kept + rows_quarantined``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import cleaning, demo_data
from .config import DEMO_DATA, DataConfig
from .formats import Detection, FormatError, Problem, canonical_text, detect_format, to_canonical, validate
from .paths import RunPaths, write_jsonl
from .readers import iter_records

log = logging.getLogger("ftkit")

DEMO_PRESET = {"columns": {"user": "ticket", "assistant": "reply"}, "conversation_column": "conversation_id",
               "turn_column": "turn"}


@dataclass
class PrepResult:
    """What stage 01 did, for the report and the metrics file."""

    sources: list[str]
    detection: Detection
    rows_in: int = 0
    rows_kept: int = 0
    quarantined: list[dict] = field(default_factory=list)
    whitespace_fixed: int = 0
    pii: Counter = field(default_factory=Counter)
    placeholders: Counter = field(default_factory=Counter)
    leakage: dict = field(default_factory=dict)
    near_dup_method: str | None = None
    splits: dict[str, list[dict]] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return self.sources[0] if len(self.sources) == 1 else ", ".join(self.sources)

    def metrics(self) -> dict:
        reasons = Counter(q["reason_code"] for q in self.quarantined)
        return {
            "sources": self.sources,
            "format": self.detection.format,
            "format_reason": self.detection.reason,
            "rows_in": self.rows_in,
            "rows_kept": self.rows_kept,
            "rows_quarantined": len(self.quarantined),
            "quarantine_reasons": dict(reasons),
            "whitespace_fixed": self.whitespace_fixed,
            "pii_found": dict(self.pii),
            "placeholders": dict(self.placeholders.most_common(20)),
            "near_duplicate_method": self.near_dup_method,
            "conversations": {k: len(v) for k, v in self.splits.items()},
            "rows": {k: sum(len(c["sources"]) for c in v) for k, v in self.splits.items()},
            "leakage": self.leakage,
        }


def effective_config(cfg: DataConfig) -> DataConfig:
    """The demo is a preset: its columns and conversation ids apply unless set explicitly."""
    if cfg.path != DEMO_DATA:
        return cfg
    return dataclasses.replace(
        cfg, columns=cfg.columns or DEMO_PRESET["columns"],
        conversation_column=cfg.conversation_column or DEMO_PRESET["conversation_column"],
        turn_column=cfg.turn_column or DEMO_PRESET["turn_column"])


def resolve_sources(cfg: DataConfig, paths: RunPaths, seed: int) -> list[Path]:
    """The raw inputs: the user's ``data.path`` (file, folder, glob or list) or the demo export."""
    if cfg.path == DEMO_DATA:
        return [demo_data.write_csv(paths.raw_demo, n=cfg.demo_size, seed=seed)]
    items = cfg.path if isinstance(cfg.path, list) else [cfg.path]
    return [Path(p).expanduser() for p in items]


def detect(cfg: DataConfig, sources) -> Detection:
    if cfg.format != "auto":
        return Detection(cfg.format, "set by data.format", cfg.columns or None)
    readable = (loc.record for loc in iter_records(sources) if loc.record is not None)
    return detect_format(readable, cfg.columns or None)


def prepare(cfg: DataConfig, paths: RunPaths, seed: int) -> PrepResult:
    """Run stage 01 end to end; writes the splits and the quarantine file."""
    cfg = effective_config(cfg)
    sources = resolve_sources(cfg, paths, seed)
    detection = detect(cfg, sources)
    log.info("format: %s (%s)", detection.format, detection.reason)
    res = PrepResult(sources=[str(s) for s in sources], detection=detection)

    def quarantine(where, record, code, reason):
        res.quarantined.append({"source": where, "reason_code": code, "reason": reason, "record": record})

    rows: list[dict] = []
    seen: dict[str, str] = {}
    for loc in iter_records(sources):
        res.rows_in += 1
        if loc.error:
            quarantine(loc.where, None, "unreadable", loc.error)
            continue
        try:
            rec = to_canonical(loc.record, detection)
        except FormatError as e:
            quarantine(loc.where, loc.record, e.problems[0].code, "; ".join(map(str, e.problems)))
            continue
        rec = _clean(rec, cfg, res)
        if cfg.placeholders == "drop" and any(cleaning.PLACEHOLDER.search(t) for t in cleaning.contents(rec)):
            quarantine(loc.where, loc.record, "placeholder", "contains {{placeholders}} and data.placeholders is 'drop'")
            continue
        group = _meta_value(rec, cfg.conversation_column)
        turn = _meta_value(rec, cfg.turn_column)
        key = hashlib.sha1(json.dumps([group, turn, canonical_text(rec)], default=str).encode()).hexdigest()
        if key in seen:
            quarantine(loc.where, loc.record, "duplicate", f"exact duplicate of {seen[key]}")
            continue
        seen[key] = loc.where
        rows.append({"rec": rec, "where": loc.where, "group": group, "turn": turn, "raw": loc.record})

    convs = _group(rows, cfg)
    kept = []
    for conv in convs:
        problems = validate(conv, alternate=cfg.alternate_roles, max_chars=cfg.max_chars)
        total_chars = sum(len(t) for t in cleaning.contents(conv))
        if not problems and total_chars < cfg.min_chars:
            problems = [Problem("", f"{total_chars} characters < data.min_chars={cfg.min_chars}", "too_short")]
        if problems:
            code = problems[0].code
            for where in conv["sources"]:
                quarantine(where, conv, code, "; ".join(map(str, problems)))
            continue
        kept.append(conv)

    if cfg.near_duplicate_threshold is not None and kept:
        res.near_dup_method = f"{cleaning.NEAR_DUP_METHOD} >= {cfg.near_duplicate_threshold}"
        dups = cleaning.near_duplicates([canonical_text(c) for c in kept], cfg.near_duplicate_threshold)
        for i, (j, sim) in dups.items():
            for where in kept[i]["sources"]:
                quarantine(where, kept[i], "near_duplicate",
                           f"near-duplicate (Jaccard ≈ {sim:.2f}) of {kept[j]['sources'][0]}")
        kept = [c for i, c in enumerate(kept) if i not in dups]

    if cfg.max_records is not None:
        for c in kept[cfg.max_records:]:
            for where in c["sources"]:
                quarantine(where, c, "over_max_records", f"beyond data.max_records={cfg.max_records}")
        kept = kept[: cfg.max_records]

    res.rows_kept = sum(len(c["sources"]) for c in kept)
    res.splits = split_records(kept, cfg, seed)
    res.leakage = leakage_report(res.splits, cfg.leakage_threshold)
    for name, items in res.splits.items():
        write_jsonl(paths.split(name), items)
    write_jsonl(paths.quarantine, res.quarantined)
    if res.rows_in != res.rows_kept + len(res.quarantined):
        raise AssertionError(f"row accounting is off: {res.rows_in} in, {res.rows_kept} kept, "
                             f"{len(res.quarantined)} quarantined")
    return res


def _meta_value(rec: dict, column: str | None):
    if not column:
        return None
    v = rec.get("meta", {}).get(column)
    return None if v in ("", None) else v


def _clean(rec: dict, cfg: DataConfig, res: PrepResult) -> dict:
    before = cleaning.contents(rec)
    rec = cleaning.map_contents(rec, cleaning.normalise_text)
    if cleaning.contents(rec) != before:
        res.whitespace_fixed += 1
    for text in cleaning.contents(rec):
        res.placeholders.update(m.group(1).strip() for m in cleaning.PLACEHOLDER.finditer(text))
    if cfg.pii != "off":
        types, pattern = cfg.pii_types, cfg.order_id_pattern
        for text in cleaning.contents(rec):
            res.pii.update(kind for kind, _, _ in cleaning.find_pii(text, types, pattern))
        if cfg.pii == "scrub":
            rec = cleaning.map_contents(rec, lambda t: cleaning.scrub_pii(t, types, pattern)[0])
    if cfg.placeholders == "fill":
        rec = cleaning.map_contents(rec, cleaning.fill_placeholders)
    return rec


def _group(rows: list[dict], cfg: DataConfig) -> list[dict]:
    """Rows sharing a conversation id become one conversation, in turn order."""
    if not cfg.conversation_column:
        return [{**r["rec"], "id": r["where"], "sources": [r["where"]]} for r in rows]
    groups: dict[object, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group"] if r["group"] is not None else r["where"], []).append(r)
    convs = []
    for gid, members in groups.items():
        members.sort(key=lambda r: _turn_key(r["turn"]))
        first = members[0]["rec"]
        if "text" in first:
            convs += [{**m["rec"], "id": m["where"], "sources": [m["where"]]} for m in members]
            continue
        messages = []
        for k, m in enumerate(members):
            msgs = m["rec"]["messages"]
            messages += msgs if k == 0 else [x for x in msgs if x.get("role") != "system"]
        convs.append({"messages": messages, "meta": first.get("meta", {}), "id": str(gid),
                      "sources": [m["where"] for m in members]})
    return convs


def _turn_key(turn):
    try:
        return (0, float(turn))
    except (TypeError, ValueError):
        return (1, str(turn))


def split_records(records: list[dict], cfg: DataConfig, seed: int) -> dict[str, list[dict]]:
    """Train/val/test: seeded; stratified by ``label_column``; grouped by ``group_column`` (scikit-learn)."""
    n = len(records)
    idx = list(range(n))
    labels = [str(_meta_value(r, cfg.label_column)) for r in records] if cfg.label_column else None
    groups = [str(_meta_value(r, cfg.group_column) or r["id"]) for r in records] if cfg.group_column else None
    test_idx = _take(idx, cfg.test_fraction, labels, groups, seed)
    in_test = set(test_idx)
    rest = [i for i in idx if i not in in_test]
    frac_val = cfg.val_fraction / (1 - cfg.test_fraction) if cfg.test_fraction < 1 else 0
    val_idx = _take(rest, frac_val, labels, groups, seed + 1)
    held = set(test_idx) | set(val_idx)
    train_idx = [i for i in idx if i not in held]
    random.Random(seed).shuffle(train_idx)
    return {"train": [records[i] for i in train_idx], "val": [records[i] for i in val_idx],
            "test": [records[i] for i in test_idx]}


def _take(idx: list[int], fraction: float, labels, groups, seed: int) -> list[int]:
    """A seeded subset of ``idx`` of about ``fraction``, stratified/grouped when asked."""
    k = round(len(idx) * fraction)
    if k == 0 or not idx:
        return []
    if groups is not None:
        from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

        g = [groups[i] for i in idx]
        if labels is not None:
            n_splits = max(2, round(1 / fraction))
            folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
            _, held = next(folds.split(idx, [labels[i] for i in idx], g))
        else:
            _, held = next(GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed).split(idx, groups=g))
        return [idx[j] for j in held]
    if labels is not None:
        from sklearn.model_selection import train_test_split

        y = [labels[i] for i in idx]
        counts = Counter(y)
        if min(counts.values()) >= 2 and k >= len(counts):
            _, held = train_test_split(idx, test_size=k, stratify=y, random_state=seed)
            chosen = set(held)
            return [i for i in idx if i in chosen]
        log.warning("label_column: some labels have fewer than 2 records or too many labels for the split size; "
                    "splitting without stratification")
    order = idx[:]
    random.Random(seed).shuffle(order)
    return order[:k]


def leakage_report(splits: dict[str, list[dict]], threshold: float) -> dict:
    """Near-duplicates of held-out records in train (what a model could have memorised)."""
    train = [canonical_text(r) for r in splits["train"]]
    out = {"threshold": threshold, "method": cleaning.NEAR_DUP_METHOD}
    for name in ("val", "test"):
        held = [canonical_text(r) for r in splits[name]]
        hits = cleaning.cross_split_near_duplicates(train, held, threshold) if train and held else []
        out[name] = {"records": len(held), "near_duplicates_in_train": len(hits),
                     "share": len(hits) / len(held) if held else 0.0,
                     "examples": [{"held_out": splits[name][i]["id"], "train": splits["train"][j]["id"],
                                   "jaccard": round(s, 3)} for i, j, s in hits[:5]]}
    return out


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
