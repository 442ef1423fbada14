"""Stage 02: canonical records → chat template → tokens with assistant-only labels, verified.

Every example's mask is verified: the decoded trained tokens must equal the assistant contents
plus the end-of-turn token (whitespace aside); a mismatch is quarantined with the two texts.
Over-long examples are dropped, truncated at a turn boundary, split (plain text) or stop the run
(``convert.over_length``): always counted, never silent.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field

import numpy as np

from ftkit.core.config import ExperimentConfig
from ftkit.core.files import read_jsonl, write_jsonl
from ftkit.core.formats import to_openai, with_system_prompt
from ftkit.core.masking import (
    IGNORE_INDEX,
    Example,
    HistoryRewriteError,
    TemplateError,
    build_example,
    end_of_turn_token_id,
    folds_system,
    trained_text,
    turn_prefix,
)
from ftkit.core.paths import RunPaths
from ftkit.core.preference import is_preference, step_tokens

log = logging.getLogger("ftkit")
SPLITS = ("train", "val", "test")
_WS = re.compile(r"\s+")


class DataError(ValueError):
    """A record that the configuration says must stop the run."""


@dataclass
class ConversionResult:
    records_in: dict[str, int] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)
    truncated: dict[str, int] = field(default_factory=dict)
    split: dict[str, int] = field(default_factory=dict)
    """plain-text records cut into max_seq_len pieces (``convert.over_length: split``), per split"""
    quarantined: list[dict] = field(default_factory=list)
    lengths: dict[str, list[int]] = field(default_factory=dict)
    step_lengths: dict[str, list[int]] = field(default_factory=dict)
    """tokens each preference row puts through the model in a training step (core.preference.step_tokens)"""
    trained_share: dict[str, list[float]] = field(default_factory=dict)
    turns: dict[str, list[int]] = field(default_factory=dict)
    trained_tokens: dict[str, int] = field(default_factory=dict)
    total_tokens: dict[str, int] = field(default_factory=dict)
    examples: list[Example] = field(default_factory=list)
    per_reply: dict[str, int] = field(default_factory=dict)
    """conversations trained as one example per reply (the template rewrites earlier turns), per split"""
    system_folded: dict[str, int] = field(default_factory=dict)
    """records whose system message went into the first user turn (the template has no system role)"""
    template_source: str = "the model's own"
    preference: dict[str, dict] = field(default_factory=dict)
    """preference data per split: pairs, KTO records, reply lengths, the chosen/rejected length ratio"""

    @property
    def example(self) -> Example | None:
        return self.examples[0] if self.examples else None

    def metrics(self, max_seq_len: int) -> dict:
        reasons: dict[str, int] = {}
        for q in self.quarantined:
            reasons[q["reason_code"]] = reasons.get(q["reason_code"], 0) + 1
        stats = {}
        for name, lens in self.lengths.items():
            arr = np.array(lens or [0])
            stats[name] = {
                "examples": len(lens), "tokens": int(arr.sum()), "trained_tokens": self.trained_tokens[name],
                "mean": float(arr.mean()), "p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)),
                "max": int(arr.max()), "trained_token_share": self.trained_tokens[name] / max(self.total_tokens[name], 1),
                "truncated": self.truncated.get(name, 0), "split_records": self.split.get(name, 0),
                "one_example_per_reply": self.per_reply.get(name, 0),
            }
        return {"records_in": self.records_in, "kept": self.kept, "quarantined": len(self.quarantined),
                "quarantine_reasons": reasons, "max_seq_len": max_seq_len, "token_stats": stats,
                "chat_template": self.template_source, "system_folded": self.system_folded,
                **({"preference": self.preference} if any(v.get("pairs") or v.get("kto_records")
                                                          for v in self.preference.values()) else {})}


def build_text_example(tokenizer, text: str) -> Example:
    """Completion tuning on plain text: every token trained, EOS appended so the model learns to stop."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        ids = [tokenizer.bos_token_id] + ids
    ids = ids + [tokenizer.eos_token_id]
    return Example(ids, list(ids))


def split_text_example(ex: Example, max_len: int) -> list[Example]:
    """A plain-text example cut into consecutive pieces of at most ``max_len`` tokens (the last
    keeps the EOS); every token is kept and trained."""
    return [Example(ex.input_ids[i:i + max_len], ex.labels[i:i + max_len]) for i in range(0, len(ex.input_ids), max_len)]


def expected_trained_text(messages: list[dict], eot_text: str) -> str:
    return "".join(m["content"] + eot_text for m in messages if m["role"] == "assistant" and m.get("weight", 1) != 0)


def verify_mask(tokenizer, messages: list[dict], ex: Example, eot_text: str, prefix: str = "") -> str | None:
    """None when each trained run of tokens decodes to its assistant reply + end-of-turn (whitespace
    aside; the template's constant ``prefix`` allowed before a reply), else the reason."""
    wrong = next((k for k, (t, lab) in enumerate(zip(ex.input_ids, ex.labels, strict=True))
                  if lab != IGNORE_INDEX and lab != t), None)
    if wrong is not None:
        return f"label at position {wrong} is {ex.labels[wrong]} but the input token there is {ex.input_ids[wrong]}"
    runs = _trained_runs(ex)
    replies = [m["content"] for m in messages if m["role"] == "assistant" and m.get("weight", 1) != 0]
    ok = len(runs) == len(replies) and all(
        _WS.sub("", tokenizer.decode(run)) in (_WS.sub("", reply + eot_text), _WS.sub("", prefix + reply + eot_text))
        for run, reply in zip(runs, replies, strict=False))
    if ok:
        return None
    got = trained_text(tokenizer, ex)
    want = expected_trained_text(messages, eot_text)
    return f"trained tokens decode to {got[:200]!r}, expected {want[:200]!r}"


def _trained_runs(ex: Example) -> list[list[int]]:
    """The trained token ids, one list per contiguous run (one run per trained assistant turn)."""
    runs: list[list[int]] = []
    prev = False
    for t, lab in zip(ex.input_ids, ex.labels, strict=True):
        trained = lab != IGNORE_INDEX
        if trained and not prev:
            runs.append([])
        if trained:
            runs[-1].append(t)
        prev = trained
    return runs


def fit_length(tokenizer, messages: list[dict], max_len: int) -> tuple[list[dict], Example] | None:
    """Drop trailing turns until the conversation fits (at least one trained reply kept)."""
    msgs = list(messages)
    while True:
        last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=None)
        if last_user is None or last_user == next(i for i, m in enumerate(msgs) if m["role"] != "system"):
            return None
        msgs = msgs[:last_user]
        if not any(m["role"] == "assistant" and m.get("weight", 1) != 0 for m in msgs):
            return None
        ex = build_example(tokenizer, msgs)
        if len(ex.input_ids) <= max_len:
            return msgs, ex


def run_tokenizer(cfg: ExperimentConfig, paths: RunPaths):
    """The model's tokenizer with the configured chat template, saved for stages 03-05."""
    from ftkit.core.modeling import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path(cfg.model.name), cfg.model,
                         chat_template=cfg.convert.chat_template)
    from ftkit.core.files import atomic

    with atomic(paths.tokenizer_dir, directory=True) as tmp:  # stages 03-05 never load half a tokenizer
        tok.save_pretrained(tmp)
    return tok


def process_record(tokenizer, rec: dict, *, system_prompt: str | None, max_seq_len: int, over_length: str,
                   eot_text: str, prefix: str = "") -> dict:
    """Convert one canonical record: ``{"ok": True, "chat", "tokens", "truncated", "turns"}`` or
    ``{"ok": False, "code", "reason"}``; ``tokens`` is a list (one example, or a split text's
    pieces). Pure, so it can run in worker processes. Preference records: :mod:`ftkit.convert.pairs`."""
    if is_preference(rec):
        from ftkit.convert.pairs import process_preference

        return process_preference(tokenizer, rec, process_record, system_prompt=system_prompt, max_seq_len=max_seq_len,
                                  over_length=over_length, eot_text=eot_text, prefix=prefix)
    if "text" in rec and "messages" not in rec:
        messages, ex = None, build_text_example(tokenizer, rec["text"])
    else:
        messages = with_system_prompt(rec["messages"], system_prompt)
        try:
            ex = build_example(tokenizer, messages)
        except HistoryRewriteError as e:
            return per_reply(tokenizer, rec, messages, e, max_seq_len=max_seq_len, over_length=over_length,
                             eot_text=eot_text, prefix=prefix)
        except TemplateError as e:
            return {"ok": False, "code": "template_error", "reason": str(e)}
        except Exception as e:  # the template's own raise_exception (roles, tool calls it cannot render)
            return {"ok": False, "code": "template_error",
                    "reason": f"the chat template refused this conversation: {type(e).__name__}: {e}"}
    truncated, pieces = False, [ex]
    if len(ex.input_ids) > max_seq_len:
        reason = f"{len(ex.input_ids)} tokens > convert.max_seq_len={max_seq_len}"
        if over_length == "error":
            return {"ok": False, "code": "over_length_error", "reason": reason}
        if messages is None and over_length == "split":
            pieces = split_text_example(ex, max_seq_len)
        else:
            cut = over_length in ("truncate", "split")
            fitted = fit_length(tokenizer, messages, max_seq_len) if cut and messages else None
            if fitted is None:
                how = ("no turn boundary leaves a trained reply within the limit" if messages and cut
                       else "dropped (convert.over_length: drop)" if messages
                       else f"plain text is not cut at turns (convert.over_length: {over_length}); set "
                            "convert.over_length: split to train on it in max_seq_len pieces")
                return {"ok": False, "code": "over_length", "reason": f"{reason}; {how}"}
            messages, ex = fitted
            pieces, truncated = [ex], True
    if messages is not None:
        problem = verify_mask(tokenizer, messages, ex, eot_text, prefix)
        if problem:
            return {"ok": False, "code": "mask_mismatch", "reason": problem}
    if ex.n_trained == 0:
        return {"ok": False, "code": "no_trained_tokens", "reason": "no token carries the loss"}
    body = {"messages": messages} if messages is not None else {"text": rec["text"]}
    ids = [rec.get("id")] if len(pieces) == 1 else [f"{rec.get('id')}#{k}" for k in range(len(pieces))]
    return {"ok": True, "truncated": truncated, "chat": {"id": rec.get("id"), **body, "meta": rec.get("meta", {})},
            "tokens": [{"id": i, **p.to_dict()} for i, p in zip(ids, pieces, strict=True)],
            "turns": sum(1 for m in messages if m["role"] == "assistant") if messages else 1}


def per_reply(tokenizer, rec: dict, messages: list[dict], error: Exception, **kw) -> dict:
    """A conversation whose template rewrites earlier turns (Qwen3), as one example per trained reply:
    reply k is trained as the last turn of messages up to it, the earlier replies in the form the
    template gives history (untrained), which is what the model sees when it writes reply k. The
    record is kept only when every reply converts; otherwise the first failure is its reason."""
    trained = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("weight", 1) != 0]
    if len(trained) < 2:
        return {"ok": False, "code": "template_error", "reason": str(error)}
    pieces = []
    for i in trained:
        sub = [{**m, "weight": 0} if m["role"] == "assistant" and j != i else m for j, m in enumerate(messages[:i + 1])]
        res = process_record(tokenizer, {**rec, "messages": sub}, system_prompt=None, **kw)
        if not res["ok"]:
            return {**res, "reason": f"reply {len(pieces) + 1} of {len(trained)} (trained one per example, as the "
                                     f"template rewrites earlier turns): {res['reason']}"}
        pieces += res["tokens"]
    ids = [f"{rec.get('id')}#{k}" for k in range(len(pieces))]
    return {"ok": True, "truncated": False, "per_reply": True,
            "chat": {"id": rec.get("id"), "messages": messages, "meta": rec.get("meta", {})},
            "tokens": [{**p, "id": i} for i, p in zip(ids, pieces, strict=True)], "turns": len(trained)}


PARALLEL_FROM = 5000  # below this, worker start-up costs more than it saves


def process_many(tokenizer, records: list[dict], num_proc: int | None = None, label: str | None = None,
                 **kw) -> list[dict]:
    """:func:`process_record` over many records; with many records, ``datasets.map`` over the cores.
    ``label``: print progress lines under that name (:mod:`ftkit.core.progress`)."""
    import os

    from ftkit.core.progress import timed, track

    num_proc = num_proc or min(os.cpu_count() or 1, 8)
    if len(records) < PARALLEL_FROM or num_proc < 2:
        return [process_record(tokenizer, r, **kw)
                for r in (track(records, label, unit="records") if label else records)]
    import json as _json

    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    ds = Dataset.from_dict({"rec": [_json.dumps(r, ensure_ascii=False) for r in records]})

    def fn(batch):
        return {"out": [_json.dumps(process_record(tokenizer, _json.loads(x), **kw), ensure_ascii=False)
                        for x in batch["rec"]]}

    with timed(f"{label} ({len(records):,} records on {num_proc} processes)") if label else contextlib.nullcontext():
        done = ds.map(fn, batched=True, batch_size=500, num_proc=num_proc, remove_columns=["rec"])
    return [_json.loads(x) for x in done["out"]]


def convert(cfg: ExperimentConfig, paths: RunPaths, tokenizer) -> ConversionResult:
    """Run stage 02 for all splits; writes chat and token files and the quarantine file."""
    c = cfg.convert
    out = ConversionResult(template_source=getattr(tokenizer, "template_source", "the model's own"))
    folded = folds_system(tokenizer)
    kw = {"system_prompt": c.system_prompt, "max_seq_len": c.max_seq_len, "over_length": c.over_length,
          "eot_text": tokenizer.decode([end_of_turn_token_id(tokenizer)]), "prefix": turn_prefix(tokenizer)}
    for name in SPLITS:
        records = read_jsonl(paths.require(paths.split(name), "01_data_prep"))
        out.records_in[name] = len(records)
        chat_rows, token_rows, lens, shares, turns, steps = [], [], [], [], [], []
        out.trained_tokens[name] = out.total_tokens[name] = out.truncated[name] = out.split[name] = 0
        out.per_reply[name] = 0
        results = process_many(tokenizer, records, label=f"02_format_conversion: {name}", **kw)
        for i, (rec, res) in enumerate(zip(records, results, strict=True), 1):
            where = f"{paths.split(name)}:{i}"  # the split file's line; the record's id names its input
            if not res["ok"]:
                if res["code"] == "over_length_error":
                    raise DataError(f"{where}: {res['reason']} (record {rec.get('id')}); raise convert.max_seq_len, "
                                    "or set convert.over_length to drop or truncate")
                out.quarantined.append({"source": where, "id": rec.get("id"), "reason_code": res["code"],
                                        "reason": res["reason"], "record": rec})
                continue
            chat_rows.append(res["chat"])
            out.truncated[name] += res["truncated"]
            if res.get("per_reply"):
                out.per_reply[name] += 1
            else:
                out.split[name] += len(res["tokens"]) > 1
            for piece in res["tokens"]:
                ex = Example(piece["input_ids"], piece["labels"])
                token_rows.append(piece)
                if "prompt_ids" in piece:
                    steps.append(step_tokens(piece))
                lens.append(len(ex.input_ids))
                shares.append(ex.n_trained / len(ex.input_ids))
                turns.append(res["turns"])
                out.trained_tokens[name] += ex.n_trained
                out.total_tokens[name] += len(ex.input_ids)
                if name == "train" and len(out.examples) < 3:
                    out.examples.append(ex)
        from ftkit.convert.pairs import pair_metrics

        out.preference[name] = pair_metrics(token_rows)
        write_jsonl(paths.chat(name), chat_rows)
        write_jsonl(paths.tokens(name), token_rows)
        write_jsonl(paths.openai_export(name), (to_openai(r) for r in chat_rows if "messages" in r))
        out.kept[name] = len(chat_rows)
        out.system_folded[name] = sum(1 for r in chat_rows if "messages" in r and r["messages"][0]["role"] == "system") \
            if folded else 0
        out.lengths[name], out.trained_share[name], out.turns[name] = lens, shares, turns
        out.step_lengths[name] = steps
    write_jsonl(paths.format_quarantine, out.quarantined)
    return out


__all__ = ["IGNORE_INDEX", "ConversionResult", "DataError", "build_text_example", "convert", "fit_length",
           "process_many", "process_record", "split_text_example", "verify_mask"]
