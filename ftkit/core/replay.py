"""Forgetting guard: mix a share of general instruction data into the training split.

With ``data.general_path`` the general data comes from your file (any supported format);
without it, from **self-distillation**: the base model's own greedy answers to the general prompts
shipped in ``ftkit/resources/general_prompts.jsonl``, generated under the same system prompt as
training, so fine-tuning keeps rehearsing what the base model already did. Only answers that end
on their own within ``data.general_max_new_tokens`` (end-of-turn reached) are used, never cut ones.
Mixed into train only, marked ``meta.source``.

The shipped prompts mix short questions (most answers end within the cap) with longer tasks spread
evenly through them, so any mix size asks both. On the demo, 142 distinct answers (of 199 prompts
asked) against 29 from the 60 long-form prompts shipped before took the forgetting check from +35%
to +16% (bench/README.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from importlib import resources

from ftkit.core.files import read_jsonl, write_jsonl
from ftkit.core.formats import with_system_prompt
from ftkit.core.paths import RunPaths
from ftkit.core.validation import validate

log = logging.getLogger("ftkit")


def _prompts_text() -> str:
    return resources.files("ftkit").joinpath("resources/general_prompts.jsonl").read_text(encoding="utf-8")


def general_prompts(text: str | None = None) -> list[str]:
    text = _prompts_text() if text is None else text
    return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]


def cache_key(cfg, prompts_text: str | None = None) -> dict:
    """What the cached answers depend on besides how many prompts were asked: the model, the system
    prompt, the token cap, the sampling (temperature, seed) and the shipped prompts themselves (a
    changed file asks again)."""
    return {"model": cfg.model.name, "system_prompt": cfg.convert.system_prompt,
            "max_new_tokens": cfg.data.general_max_new_tokens, "temperature": cfg.data.general_temperature,
            "seed": cfg.seed,
            "prompts_sha256": hashlib.sha256((prompts_text or _prompts_text()).encode()).hexdigest()[:16]}


def from_file(path: str, encoding: str = "utf-8", skipped: list[str] | None = None) -> list[dict]:
    """The usable chat records of a general-data file; each unusable one is named (``path:LINE: reason``)
    in ``skipped`` and counted in a warning, never dropped unsaid."""
    from ftkit.core import records

    out, bad = [], []
    for item in records.canonical(path, records.detect(path, encoding=encoding, set_by="detection"), encoding):
        problems = item.problems or validate(item.record)
        if problems:
            bad.append(f"{item.where}: {'; '.join(map(str, problems))}")
        else:
            out.append({**item.record, "meta": {**item.record.get("meta", {}), "source": "general_file"}})
    if bad:
        log.warning("%s: %d general record(s) not used, e.g. %s", path, len(bad), bad[0])
    if skipped is not None:
        skipped.extend(bad)
    return out


def self_distilled(cfg, n: int, cache) -> list[dict]:
    """The base model's answers to up to ``n`` shipped general prompts, cached: a rerun with the same
    model, system prompt and prompts reads them back instead of generating them again. Each record's
    ``meta`` says what it was generated from (``asked``: how many prompts were put, answered or not,
    so a cache holding fewer answers than prompts is still a hit)."""
    from ftkit.core.generation import generate, rows_per_batch
    from ftkit.core.masking import render
    from ftkit.core.modeling import load_model, load_tokenizer, resolve_model_path, stop_token_ids

    text = _prompts_text()
    prompts = general_prompts(text)[:n]
    key = cache_key(cfg, text)
    if cache.exists():
        cached = read_jsonl(cache)
        meta = cached[0]["meta"] if cached else {}
        if cached and all(meta.get(k) == v for k, v in key.items()) and meta.get("asked", 0) >= len(prompts):
            log.info("general mix: self-distilled answers read from %s", cache)
            asked = set(prompts)
            return [r for r in cached if r["messages"][0]["content"] in asked]
    path = resolve_model_path(cfg.model.name)
    tok = load_tokenizer(path, cfg.model)
    model = load_model(path, cfg.model)
    chats = [with_system_prompt([{"role": "user", "content": p}], cfg.convert.system_prompt) for p in prompts]
    temperature = cfg.data.general_temperature
    sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "seed": cfg.seed} if temperature > 0 else {}
    cap = cfg.data.general_max_new_tokens
    prompt_tokens = max(len(tok(render(tok, c, add_generation_prompt=True), add_special_tokens=False)["input_ids"])
                        for c in chats)
    gens = generate(model, tok, chats, max_new_tokens=cap, batch_size=rows_per_batch(model, len(chats), prompt_tokens + cap),
                    stop_ids=stop_token_ids(tok), **sampling)
    out = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": g["text"]}],
            "meta": {"source": "replay", **key, "asked": len(prompts)}}
           for p, g in zip(prompts, gens, strict=True) if g["stopped"] and g["text"].strip()]
    write_jsonl(cache, out)
    return out


def mix_general(cfg, paths: RunPaths, result) -> dict:
    """Append ``data.general_mix`` × |train| general records to the train split; returns what was done."""
    d = cfg.data
    if d.general_mix <= 0:
        return {"general_mix": 0.0, "added": 0}
    train = read_jsonl(paths.split("train"))
    want = max(1, round(d.general_mix * len(train)))
    skipped: list[str] = []
    if d.general_path:
        pool, source = from_file(d.general_path, d.encoding, skipped), f"file {d.general_path}"
    else:
        pool, source = self_distilled(cfg, want, paths.replay_cache), "self-distillation (base model)"
    random.Random(cfg.seed).shuffle(pool)
    # fewer distinct records than the mix asks for (self-distillation keeps only the answers that stop):
    # each is repeated, in turn, so the share of general data in train is the one configured
    chosen = [pool[i % len(pool)] for i in range(want)] if pool else []
    added = [{**r, "id": f"general-{i}", "sources": [r.get("meta", {}).get("source", "general")]}
             for i, r in enumerate(chosen)]
    distinct = min(len(pool), want)
    if distinct < want:
        log.warning("general mix: wanted %d records, %d distinct available from %s; each repeated to reach %d",
                    want, distinct, source, len(added))
    write_jsonl(paths.split("train"), train + added)
    result.general = {"general_mix": d.general_mix, "source": source, "wanted": want, "added": len(added),
                      "distinct": distinct, "skipped": len(skipped), "skipped_examples": skipped[:5]}
    return result.general
