"""Stage 01: read any supported input, convert to canonical chat records, clean, split.

One module because the order of work below is one streamed pass whose counts must add up
(``rows_in == rows_kept + rows_quarantined``); its pieces (cleaning, readers, formats) live apart.

Order of work: read (streamed) → detect the format → convert each record → normalise text,
count/scrub PII, handle ``{{placeholders}}`` → drop exact duplicate rows → group rows into
conversations (``data.conversation_column``) → validate → length filter → near-duplicates →
split (seeded; stratified by ``data.label_column``; grouped by ``data.group_column``) → leakage
check across splits.

Nothing is dropped silently: every input row that is not kept is written to the quarantine file
with its source (``path:LINE`` or ``path:ROW``), a reason code and a reason a person understands, and
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

from ftkit.core import records
from ftkit.core.config import DEMO_DATA, DEMO_PREFERENCE_DATA, DataConfig
from ftkit.core.files import write_jsonl
from ftkit.core.formats import Detection, FormatError, Problem, canonical_text
from ftkit.core.paths import RunPaths
from ftkit.core.preference import is_preference
from ftkit.core.validation import validate
from ftkit.data import cleaning, demo_data

log = logging.getLogger("ftkit")

DEMO_PRESET = {"columns": {"user": "ticket", "assistant": "reply"}, "conversation_column": "conversation_id",
               "turn_column": "turn"}


@dataclass
class PrepResult:
    """What stage 01 did, for the report and the metrics file (no record is held here)."""

    sources: list[str]
    detection: Detection
    quarantine_path: Path
    rows_in: int = 0
    rows_kept: int = 0
    reasons: Counter = field(default_factory=Counter)
    whitespace_fixed: int = 0
    pii: Counter = field(default_factory=Counter)
    pii_mode: str = "report"
    pii_records: int = 0
    pii_where: list[dict] = field(default_factory=list)
    """The first records holding PII: their source and the kinds found (never the values)."""
    pii_scrubbed: list[str] = field(default_factory=list)
    """With ``data.pii: scrub``, excerpts of scrubbed text around the replacements, as training sees it."""
    placeholders: Counter = field(default_factory=Counter)
    leakage: dict = field(default_factory=dict)
    near_dup_method: str | None = None
    split_sizes: dict[str, int] = field(default_factory=dict)
    split_rows: dict[str, int] = field(default_factory=dict)
    stats: dict[str, dict[str, list]] = field(default_factory=dict)
    """Per split: `chars`, `turns` and `labels` of each conversation (for plots)."""
    sample: list[dict] = field(default_factory=list)
    """The first few training conversations (for the report)."""
    general: dict = field(default_factory=dict)
    """What the forgetting guard added to train (see ftkit.core.replay)."""

    @property
    def source(self) -> str:
        return self.sources[0] if len(self.sources) == 1 else ", ".join(self.sources)

    @property
    def rows_quarantined(self) -> int:
        return sum(self.reasons.values())

    @property
    def quarantined(self) -> list[dict]:
        """The quarantine file's records (read on demand: it can be large)."""
        from ftkit.core.files import read_jsonl

        return read_jsonl(self.quarantine_path)

    def quarantine_head(self, n: int = 20) -> list[dict]:
        import itertools

        with open(self.quarantine_path, encoding="utf-8") as f:
            return [json.loads(line) for line in itertools.islice(f, n)]

    def metrics(self) -> dict:
        return {
            "sources": self.sources,
            "format": self.detection.format,
            "format_reason": self.detection.reason,
            "rows_in": self.rows_in,
            "rows_kept": self.rows_kept,
            "rows_quarantined": self.rows_quarantined,
            "quarantine_reasons": dict(self.reasons),
            "whitespace_fixed": self.whitespace_fixed,
            "pii_found": dict(self.pii),
            "pii_mode": self.pii_mode,
            "pii_records": self.pii_records,
            "pii_where": self.pii_where,
            "pii_scrubbed_examples": self.pii_scrubbed,
            "placeholders": dict(self.placeholders.most_common(20)),
            "near_duplicate_method": self.near_dup_method,
            "conversations": dict(self.split_sizes),
            "rows": dict(self.split_rows),
            "leakage": self.leakage,
            "general_mix": self.general,
        }


class _Spool:
    """Records appended to a work file as JSON lines and read back by offset: the pipeline keeps
    offsets and a few keys in memory, never the records themselves."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "w+b")  # noqa: SIM115 - closed by close()
        self.path = path

    def add(self, obj) -> int:
        self.f.seek(0, 2)
        offset = self.f.tell()
        self.f.write(json.dumps(obj, ensure_ascii=False, default=str).encode() + b"\n")
        return offset

    def get(self, offset: int):
        self.f.seek(offset)
        return json.loads(self.f.readline())

    def close(self) -> None:
        self.f.close()
        self.path.unlink(missing_ok=True)


class _Quarantine:
    """Streams quarantined rows to the quarantine file and counts reasons; the file is written under a
    temporary name and put in place by ``close(complete=True)``, so a stage that fails or is killed
    leaves the previous quarantine file, never half of a new one."""

    def __init__(self, path: Path, result: PrepResult):
        from ftkit.core.files import atomic

        self._commit = atomic(path)
        self.f = open(self._commit.__enter__(), "w", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self.result = result

    def __call__(self, where: str, record, code: str, reason: str) -> None:
        self.f.write(json.dumps({"source": where, "reason_code": code, "reason": reason, "record": record},
                                ensure_ascii=False, default=str) + "\n")
        self.result.reasons[code] += 1

    def close(self, complete: bool) -> None:
        self.f.close()
        if complete:
            self._commit.__exit__(None, None, None)
        else:  # the temporary file goes; the exception that stopped the stage carries on
            self._commit.__exit__(RuntimeError, RuntimeError("stage 01 did not finish"), None)


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
    if cfg.path == DEMO_PREFERENCE_DATA:  # another seed than the demo's: new tickets, not the SFT run's
        return [demo_data.write_preferences(paths.raw_demo_preference, n=cfg.demo_size, seed=seed + 1)]
    items = cfg.path if isinstance(cfg.path, list) else [cfg.path]
    return [Path(p).expanduser() for p in items]


def detect(cfg: DataConfig, sources) -> Detection:
    try:
        return records.detect(sources, cfg.format, cfg.columns, cfg.encoding)
    except FormatError as e:  # stage 01 stops here: the error names the input, as a reader's own errors do
        shown = ", ".join(map(str, sources))
        if shown in str(e):
            raise
        first = e.problems[0]
        raise FormatError([dataclasses.replace(first, reason=f"{first.reason} (data.path: {shown})"),
                           *e.problems[1:]]) from None


def prepare(cfg: DataConfig, paths: RunPaths, seed: int) -> PrepResult:
    """Run stage 01 end to end, streaming; writes the splits and the quarantine file."""
    cfg = effective_config(cfg)
    sources = resolve_sources(cfg, paths, seed)
    detection = detect(cfg, sources)
    log.info("format: %s (%s)", detection.format, detection.reason)
    res = PrepResult(sources=[str(s) for s in sources], detection=detection, quarantine_path=paths.quarantine,
                     pii_mode=cfg.pii)
    quarantine = _Quarantine(paths.quarantine, res)
    rows = _Spool(paths.work_dir / "rows.jsonl")
    convs = _Spool(paths.work_dir / "conversations.jsonl")
    complete = False
    try:
        row_index = _read_rows(cfg, sources, detection, res, rows, quarantine)
        index = _build_conversations(cfg, row_index, rows, convs, quarantine)
        index = _drop_near_duplicates(cfg, index, convs, quarantine, res)
        if cfg.max_records is not None:
            for c in index[cfg.max_records:]:
                for where in c["sources"]:
                    quarantine(where, convs.get(c["offset"]), "over_max_records",
                               f"beyond data.max_records={cfg.max_records}")
            index = index[: cfg.max_records]
        res.rows_kept = sum(len(c["sources"]) for c in index)
        assignment = split_records(index, cfg, seed)
        res.leakage = leakage_report(assignment, convs, cfg)
        for name, items in assignment.items():
            write_jsonl(paths.split(name), (convs.get(c["offset"]) for c in items))
            res.split_sizes[name] = len(items)
            res.split_rows[name] = sum(len(c["sources"]) for c in items)
            res.stats[name] = {"chars": [c["chars"] for c in items], "turns": [c["turns"] for c in items],
                               "labels": [c["label"] for c in items]}
        res.sample = [convs.get(c["offset"]) for c in assignment["train"][:5]]
        complete = True
    finally:
        quarantine.close(complete)
        rows.close()
        convs.close()
    if res.rows_in != res.rows_kept + res.rows_quarantined:
        raise AssertionError(f"row accounting is off: {res.rows_in} in, {res.rows_kept} kept, "
                             f"{res.rows_quarantined} quarantined")
    return res


def _read_rows(cfg, sources, detection, res, rows: _Spool, quarantine) -> list[tuple]:
    """Pass 1, streamed: read, convert, clean, drop exact duplicates; returns (offset, group, turn, where)."""
    index = []
    seen: set[bytes] = set()
    first_seen: dict[bytes, str] = {}
    empty: list = []
    for item in records.canonical(sources, detection, cfg.encoding, empty=empty):
        res.rows_in += 1
        if item.record is None:
            quarantine(item.where, item.raw, item.code, item.reason)
            continue
        where, raw, rec = item.where, item.raw, item.record
        rec = _clean(rec, cfg, res, where)
        if cfg.placeholders == "drop" and any(cleaning.PLACEHOLDER.search(t) for t in cleaning.contents(rec)):
            quarantine(where, raw, "placeholder", "contains {{placeholders}} and data.placeholders is 'drop'")
            continue
        group = _meta_value(rec, cfg.conversation_column)
        turn = _meta_value(rec, cfg.turn_column)
        key = hashlib.blake2b(json.dumps([group, turn, canonical_text(rec)], default=str).encode(),
                              digest_size=12).digest()
        if key in seen:
            quarantine(where, raw, "duplicate", f"exact duplicate of {first_seen.get(key, 'an earlier row')}")
            continue
        seen.add(key)
        if len(first_seen) < 100_000:  # names for the report; the digest set alone decides
            first_seen[key] = where
        index.append((rows.add(rec), group, turn, where))
    for p in empty:
        log.warning("%s: no record: the file is empty, holds only blank lines or a table header only", p)
    return index


def _build_conversations(cfg, row_index, rows: _Spool, convs: _Spool, quarantine) -> list[dict]:
    """Group rows into conversations (by conversation_column, in turn order), validate, spool them."""
    if cfg.conversation_column:
        groups: dict[object, list[tuple]] = {}
        for entry in row_index:
            groups.setdefault(entry[1] if entry[1] is not None else entry[3], []).append(entry)
        members_list = [(str(g), sorted(m, key=lambda e: _turn_key(e[2]))) for g, m in groups.items()]
    else:
        members_list = [(e[3], [e]) for e in row_index]
    index = []
    for gid, members in members_list:
        recs = [rows.get(e[0]) for e in members]
        wheres = [e[3] for e in members]
        if "text" in recs[0] or len(recs) == 1:
            conv_list = [{**r, "id": w if len(recs) > 1 else gid, "sources": [w]} for r, w in zip(recs, wheres, strict=True)]
        else:
            messages = []
            for k, r in enumerate(recs):
                messages += r["messages"] if k == 0 else [x for x in r["messages"]
                                                          if not (isinstance(x, dict) and x.get("role") == "system")]
            conv_list = [{"messages": messages, "meta": recs[0].get("meta", {}), "id": gid, "sources": wheres}]
        for conv in conv_list:
            problems = validate(conv, alternate=cfg.alternate_roles, max_chars=cfg.max_chars)
            chars = sum(len(t) for t in cleaning.contents(conv))
            if not problems and chars < cfg.min_chars:
                problems = [Problem("", f"{chars} characters < data.min_chars={cfg.min_chars}", "too_short")]
            if problems:
                for where in conv["sources"]:
                    quarantine(where, conv, problems[0].code, "; ".join(map(str, problems)))
                continue
            turns = sum(1 for m in conv.get("messages", []) if m.get("role") == "assistant") or 1
            index.append({"offset": convs.add(conv), "id": conv["id"], "sources": conv["sources"], "chars": chars,
                          "turns": turns, "label": _label(conv, cfg.label_column),
                          "group": _group(conv, cfg), "pair": is_preference(conv)})
    return index


def _group(conv: dict, cfg: DataConfig) -> str:
    """What must stay in one split: ``group_column``'s value; for preference data without it, the prompt
    (a prompt's pairs answer the same question: split apart, the test set would grade a prompt trained on)."""
    from ftkit.core.preference import prompt_key

    value = _meta_value(conv, cfg.group_column)
    if value is None and is_preference(conv):
        return prompt_key(conv)
    return str(value or conv["id"])


def _label(conv: dict, column: str | None):
    v = _meta_value(conv, column)
    return None if v is None else str(v)


def _drop_near_duplicates(cfg, index, convs: _Spool, quarantine, res) -> list[dict]:
    if cfg.near_duplicate_threshold is None or not index:
        return index
    if len(index) > cfg.near_duplicate_max_records:
        res.near_dup_method = (f"skipped: {len(index):,} conversations > data.near_duplicate_max_records="
                               f"{cfg.near_duplicate_max_records:,} (exact duplicates were removed)")
        log.warning("near-duplicate check %s", res.near_dup_method)
        return index
    res.near_dup_method = f"{cleaning.NEAR_DUP_METHOD} >= {cfg.near_duplicate_threshold}"
    dups = cleaning.near_duplicates([canonical_text(convs.get(c["offset"])) for c in index],
                                    cfg.near_duplicate_threshold)
    for i, (j, sim) in dups.items():
        for where in index[i]["sources"]:
            quarantine(where, convs.get(index[i]["offset"]), "near_duplicate",
                       f"near-duplicate (Jaccard ≈ {sim:.2f}) of {index[j]['sources'][0]}")
    return [c for i, c in enumerate(index) if i not in dups]


def _meta_value(rec: dict, column: str | None):
    if not column:
        return None
    v = rec.get("meta", {}).get(column)
    return None if v in ("", None) else v


def _clean(rec: dict, cfg: DataConfig, res: PrepResult, where: str = "") -> dict:
    before = cleaning.contents(rec)
    rec = cleaning.map_contents(rec, cleaning.normalise_text)
    if cleaning.contents(rec) != before:
        res.whitespace_fixed += 1
    for text in cleaning.contents(rec):
        res.placeholders.update(m.group(1).strip() for m in cleaning.PLACEHOLDER.finditer(text))
    if cfg.pii != "off":
        types, pattern = cfg.pii_types, cfg.order_id_pattern
        kinds = Counter(kind for text in cleaning.contents(rec) for kind, _, _ in cleaning.find_pii(text, types, pattern))
        res.pii.update(kinds)
        if kinds:
            res.pii_records += 1
            if len(res.pii_where) < 5:
                res.pii_where.append({"source": where, "found": dict(kinds)})
        if cfg.pii == "scrub":
            rec = cleaning.map_contents(rec, lambda t: cleaning.scrub_pii(t, types, pattern)[0])
            if kinds and len(res.pii_scrubbed) < 3:
                res.pii_scrubbed.append(_around_replacement(" ".join(cleaning.contents(rec))))
    if cfg.placeholders == "fill":
        rec = cleaning.map_contents(rec, cleaning.fill_placeholders)
    return rec


def _around_replacement(text: str, width: int = 60) -> str:
    """The scrubbed text around its first ``[EMAIL]``-style replacement (what the report shows)."""
    import re

    m = re.search(r"\[(EMAIL|PHONE|CARD|ORDER_ID)\]", text)
    start = max(0, (m.start() if m else 0) - width)
    return ("…" if start else "") + text[start:start + 2 * width + 10].strip() + "…"


def _turn_key(turn):
    try:
        return (0, float(turn))
    except (TypeError, ValueError):
        return (1, str(turn))


def split_records(index: list[dict], cfg: DataConfig, seed: int) -> dict[str, list[dict]]:
    """Train/val/test: seeded; stratified by ``label_column``; grouped by ``group_column`` (scikit-learn),
    preference data by prompt."""
    n = len(index)
    idx = list(range(n))
    labels = [c["label"] for c in index] if cfg.label_column else None
    groups = [c["group"] for c in index] if cfg.group_column or any(c.get("pair") for c in index) else None
    test_idx = _take(idx, cfg.test_fraction, labels, groups, seed)
    in_test = set(test_idx)
    rest = [i for i in idx if i not in in_test]
    frac_val = cfg.val_fraction / (1 - cfg.test_fraction) if cfg.test_fraction < 1 else 0
    val_idx = _take(rest, frac_val, labels, groups, seed + 1)
    held = in_test | set(val_idx)
    train_idx = [i for i in idx if i not in held]
    random.Random(seed).shuffle(train_idx)
    return {"train": [index[i] for i in train_idx], "val": [index[i] for i in val_idx],
            "test": [index[i] for i in test_idx]}


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


def leakage_report(assignment: dict[str, list[dict]], convs: _Spool, cfg: DataConfig) -> dict:
    """Near-duplicates of held-out records in train (what a model could have memorised)."""
    threshold = cfg.leakage_threshold
    out = {"threshold": threshold, "method": cleaning.NEAR_DUP_METHOD}
    if len(assignment["train"]) > cfg.near_duplicate_max_records:
        out["method"] = f"skipped: more than {cfg.near_duplicate_max_records:,} training conversations"
        return out
    train = [canonical_text(convs.get(c["offset"])) for c in assignment["train"]]
    for name in ("val", "test"):
        held = [canonical_text(convs.get(c["offset"])) for c in assignment[name]]
        hits = cleaning.cross_split_near_duplicates(train, held, threshold) if train and held else []
        out[name] = {"records": len(held), "near_duplicates_in_train": len(hits),
                     "share": len(hits) / len(held) if held else 0.0,
                     "examples": [{"held_out": assignment[name][i]["id"], "train": assignment["train"][j]["id"],
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
