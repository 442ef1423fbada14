"""The reliability suite's ledger: what each test tried and what broke, summed by ``make reliability``.

Tests marked ``reliability`` call :func:`tally` with what they tried (``inputs`` malformed files or
generated inputs, ``faults`` injected, ``requests`` sent) and what went wrong (``records_lost``:
records in minus kept minus quarantined; ``crashes``: a traceback, an exception that is not one of
ftkit's documented errors, a process that died; ``server_errors``: 5xx answers). A test asserts its
own zeros; the ledger is what makes the suite's promise one table a person can read::

    python tests/reliability.py            # the table of the last run; exit 1 when a must-be-zero is not

The ledger is a JSON-lines file (``FTKIT_RELIABILITY_LEDGER``, default
``outputs/test-artifacts/reliability.jsonl``); ``make reliability`` empties it first. Outside that
target the rows still accumulate harmlessly (``make test`` runs the fast part of the suite).
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRIED = ("inputs", "faults", "requests")
BROKEN = ("records_lost", "crashes", "server_errors")
HEADINGS = {"inputs": "inputs tried", "faults": "faults injected", "requests": "requests sent",
            "records_lost": "records lost", "crashes": "crashes", "server_errors": "5xx"}


def ledger_path() -> Path:
    return Path(os.environ.get("FTKIT_RELIABILITY_LEDGER", ROOT / "outputs" / "test-artifacts" / "reliability.jsonl"))


def tally(area: str, **counts: int) -> None:
    """Add one test's counts under ``area`` (bad input, fuzzing, faults, load, abuse, security)."""
    unknown = set(counts) - set(TRIED) - set(BROKEN)
    if unknown:
        raise ValueError(f"tally: unknown count(s) {sorted(unknown)}; use {TRIED + BROKEN}")
    path = ledger_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    row = {"area": area, "test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0], **counts}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def totals(path: Path | None = None) -> dict[str, dict[str, int]]:
    by_area: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(TRIED + BROKEN, 0))
    path = path or ledger_path()
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                for k in TRIED + BROKEN:
                    by_area[row["area"]][k] += int(row.get(k, 0))
    return dict(by_area)


def table(by_area: dict[str, dict[str, int]]) -> str:
    cols = TRIED + BROKEN
    rows = [[area, *(f"{c[k]:,}" for k in cols)] for area, c in sorted(by_area.items())]
    rows.append(["total", *(f"{sum(c[k] for c in by_area.values()):,}" for k in cols)])
    head = ["area", *(HEADINGS[k] for k in cols)]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def fmt(r):
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True)))

    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *map(fmt, rows[:-1]),
                      "  ".join("-" * w for w in widths), fmt(rows[-1])])


def main() -> int:
    by_area = totals()
    if not by_area:
        print(f"no reliability results in {ledger_path()}: run make reliability", file=sys.stderr)
        return 1
    print(table(by_area))
    broken = {k: sum(c[k] for c in by_area.values()) for k in BROKEN}
    bad = {k: v for k, v in broken.items() if v}
    if bad:
        print("FAILED: " + ", ".join(f"{HEADINGS[k]} {v}" for k, v in bad.items()) + " (each must be 0)", file=sys.stderr)
        return 1
    print("records lost 0, crashes 0, 5xx 0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
