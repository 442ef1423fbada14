"""Text cleaning: normalisation, PII detection/scrubbing, templating placeholders, near-duplicates.

Pure functions over canonical records (see :mod:`ftkit.core.formats`); stage 01 calls them.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable

_INNER_SPACES = re.compile(r"(?<=\S)[ \t\u00a0]{2,}")
_TRAILING = re.compile(r"[ \t\u00a0]+$", re.M)

PII_PATTERNS: dict[str, re.Pattern] = {
    "email": re.compile(r"(?<![\w.+-])[\w.+-]+@[\w-]+(?:\.[\w-]+)+"),
    # 13-19 digits, optionally in groups of 4 separated by spaces or dashes; Luhn-checked below
    "card": re.compile(r"(?<![\w-])(?:\d[ -]?){12,18}\d(?![\w-])"),
    # international or grouped numbers with 9-15 digits and at least one separator or a leading +
    "phone": re.compile(r"(?<![\w-])(?:\+\d[\d ().-]{7,18}\d|\(?\d{2,4}\)?[ .-]\d{2,4}[ .-]\d{3,4}(?:[ .-]\d{2,4})?)(?![\w-])"),
}
PLACEHOLDER = re.compile(r"\{\{\s*([^{}]+?)\s*\}\}")
FILL_VALUES = {
    "order number": "ORD-482913", "order id": "ORD-482913", "purchase id anonymized": "ORD-482913",
    "invoice number": "INV-20931", "account type": "Premium", "account category": "Premium",
    "website url": "www.example.com", "website name": "Example", "company name": "Example Ltd",
    "customer support phone number": "+1 555 0100", "customer support hours": "9am to 5pm",
    "customer support working hours": "9am to 5pm", "person name": "Alex", "client first name": "Alex",
    "client last name": "Smith", "delivery city": "Leeds", "delivery country": "the UK", "money amount": "$20",
    "refund amount": "$20", "currency symbol": "$", "date": "12 March", "date range": "5 to 7 days",
}


def normalise_text(text: str) -> str:
    """NFC, unified newlines, trailing spaces and runs of inner spaces removed, ends stripped.

    Leading indentation is kept (code and lists keep their shape).
    """
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _TRAILING.sub("", text)
    text = _INNER_SPACES.sub(" ", text)
    return text.strip()


def luhn_ok(digits: str) -> bool:
    total, alt = 0, False
    for ch in reversed(digits):
        d = int(ch)
        if alt:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
        alt = not alt
    return total % 10 == 0


def card_like(digits: str) -> bool:
    """A payment-card number: a known brand's length and prefix, and a valid Luhn checksum."""
    n = len(digits)
    brand = ((n == 16 and digits[0] in "2456") or (n == 15 and digits[:2] in ("34", "37"))
             or (n in (13, 19) and digits[0] == "4") or (n == 14 and digits[:2] in ("36", "38")))
    return brand and luhn_ok(digits)


def find_pii(text: str, types: list[str], order_id_pattern: str | None = None) -> list[tuple[str, int, int]]:
    """(type, start, end) of each PII match, non-overlapping, in text order."""
    found: list[tuple[str, int, int]] = []
    taken: list[tuple[int, int]] = []
    patterns = [(t, PII_PATTERNS[t]) for t in ("email", "card", "phone") if t in types]
    if order_id_pattern and "order_id" in types:
        patterns.append(("order_id", re.compile(order_id_pattern)))
    for kind, pat in patterns:
        for m in pat.finditer(text):
            s, e = m.span()
            if any(a < e and s < b for a, b in taken):
                continue
            if kind == "card" and not card_like(re.sub(r"\D", "", m.group())):
                continue
            if kind == "phone" and not 9 <= len(re.sub(r"\D", "", m.group())) <= 15:
                continue
            found.append((kind, s, e))
            taken.append((s, e))
    return sorted(found, key=lambda x: x[1])


def scrub_pii(text: str, types: list[str], order_id_pattern: str | None = None) -> tuple[str, Counter]:
    """Replace PII with ``[EMAIL]``, ``[PHONE]``, ``[CARD]``, ``[ORDER_ID]``; returns the counts too."""
    counts: Counter = Counter()
    out, last = [], 0
    for kind, s, e in find_pii(text, types, order_id_pattern):
        out += [text[last:s], f"[{kind.upper()}]"]
        last = e
        counts[kind] += 1
    out.append(text[last:])
    return "".join(out), counts


def fill_placeholders(text: str) -> str:
    """``{{Order Number}}`` → a realistic value (the same one each time), unknown names → ``Name``."""
    return PLACEHOLDER.sub(lambda m: FILL_VALUES.get(m.group(1).strip().lower(), m.group(1).strip()), text)


def map_contents(record: dict, fn: Callable[[str], str]) -> dict:
    """Apply ``fn`` to every text content of a canonical record (returns a new record)."""
    if "text" in record and "messages" not in record:
        return {**record, "text": fn(record["text"]) if isinstance(record["text"], str) else record["text"]}
    msgs = [({**m, "content": fn(m["content"])} if isinstance(m, dict) and isinstance(m.get("content"), str) else m)
            for m in record["messages"]] if isinstance(record.get("messages"), list) else record.get("messages")
    out = {**record, "messages": msgs}
    r = record.get("rejected")
    if isinstance(r, dict) and isinstance(r.get("content"), str):  # a pair's rejected reply is cleaned alike
        out["rejected"] = {**r, "content": fn(r["content"])}
    return out


def contents(record: dict) -> list[str]:
    if "text" in record and "messages" not in record:
        return [record["text"]] if isinstance(record["text"], str) else []
    out = [m["content"] for m in record.get("messages") or [] if isinstance(m, dict) and isinstance(m.get("content"), str)]
    r = record.get("rejected")
    return out + [r["content"]] if isinstance(r, dict) and isinstance(r.get("content"), str) else out


# ---------------------------------------------------------------------------------------------
# near-duplicates: MinHash-LSH (datasketch) over word 3-gram shingles

NEAR_DUP_METHOD = "MinHash-LSH over word 3-grams (datasketch, 64 permutations), estimated Jaccard"
_WORD = re.compile(r"\w+")


def shingles(text: str, n: int = 3) -> list[bytes]:
    words = _WORD.findall(text.lower())
    return [" ".join(words[i:i + n]).encode() for i in range(max(1, len(words) - n + 1))]


def minhashes(texts: list[str], num_perm: int = 64):
    from datasketch import MinHash

    return MinHash.bulk([shingles(t) for t in texts], num_perm=num_perm, seed=1)


def near_duplicates(texts: list[str], threshold: float) -> dict[int, tuple[int, float]]:
    """For each text that nearly duplicates an earlier one: index → (earlier index, estimated Jaccard)."""
    from datasketch import MinHashLSH

    hashes = minhashes(texts)
    lsh = MinHashLSH(threshold=threshold, num_perm=64)
    dups: dict[int, tuple[int, float]] = {}
    for i, h in enumerate(hashes):
        best = None
        for key in lsh.query(h):
            j = int(key)
            sim = h.jaccard(hashes[j])
            # ties go to the earliest record: the set LSH returns is ordered by the hash seed
            if sim >= threshold and (best is None or (sim, -j) > (best[1], -best[0])):
                best = (j, sim)
        if best:
            dups[i] = best
        else:
            lsh.insert(str(i), h)
    return dups


def cross_split_near_duplicates(train: list[str], others: list[str], threshold: float) -> list[tuple[int, int, float]]:
    """(index in others, index in train, estimated Jaccard) for each held-out text near a train text."""
    from datasketch import MinHashLSH

    th, oh = minhashes(train), minhashes(others)
    lsh = MinHashLSH(threshold=threshold, num_perm=64)
    for i, h in enumerate(th):
        lsh.insert(str(i), h)
    hits = []
    for i, h in enumerate(oh):
        cands = [(int(k), h.jaccard(th[int(k)])) for k in lsh.query(h)]
        cands = [c for c in cands if c[1] >= threshold]
        if cands:
            j, sim = max(cands, key=lambda c: (c[1], -c[0]))  # ties: the earliest train record, whatever the hash seed
            hits.append((i, j, sim))
    return hits
