"""Benchmark: stage 01 streams. Peak memory of preparing 100,000 vs 1,000,000 records.

Writes prompt/completion JSONL files of N records, runs stage 01 on each in a fresh process and
prints its peak resident memory, the time, and, as the baseline measured in the same run, the
memory that merely holding the 100,000 records as Python objects takes (scaled to 1,000,000 it is
what a non-streaming pipeline would need at least).
Run: .venv/bin/python bench/prepare_memory.py
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import resource, sys, time
from ftkit.core.config import DataConfig
from ftkit.data.dataset import prepare
from ftkit.core.paths import RunPaths
t = time.perf_counter()
res = prepare(DataConfig(path=sys.argv[1]), RunPaths(sys.argv[2], "bench"), seed=0)
print(res.rows_in, res.rows_kept, res.rows_quarantined, time.perf_counter() - t,
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""

HOLD = """
import json, resource, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def write(path: Path, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Customer {i} asks: where is order AC-{i:06d}? It was due on day {i % 28}.",
                                "completion": f"Order AC-{i:06d} ships within {1 + i % 5} days; tracking follows "
                                              f"by email. Reference {i * 7919 % 100003}.", "ticket": i}) + "\n")


def main() -> None:
    sizes = [int(x) for x in sys.argv[1:]] or [100_000, 1_000_000]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results = {}
        for n in sizes:
            f = tmp / f"r{n}.jsonl"
            write(f, n)
            out = subprocess.run([sys.executable, "-c", CHILD, str(f), str(tmp / f"out{n}")], capture_output=True,
                                 text=True, check=True).stdout.split()
            rows_in, kept, quarantined, secs, rss = int(out[0]), int(out[1]), int(out[2]), float(out[3]), float(out[4])
            results[n] = rss
            print(f"{n:>9,} records: {rows_in:,} in = {kept:,} kept + {quarantined:,} quarantined; "
                  f"{secs:.0f} s ({n / secs:,.0f} records/s); peak RSS {rss:,.0f} MiB")
        small = sizes[0]
        held = float(subprocess.run([sys.executable, "-c", HOLD, str(tmp / f"r{small}.jsonl")], capture_output=True,
                                    text=True, check=True).stdout)
        base = float(subprocess.run([sys.executable, "-c", "import resource, ftkit.data.dataset;"
                                     "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"],
                                    capture_output=True, text=True, check=True).stdout)
        per_record = (held - 15) / small  # minus an empty interpreter
        big = sizes[-1]
        print(f"baseline: holding {small:,} records as Python objects takes {held - 15:,.0f} MiB "
              f"({per_record * 1024:.2f} KiB each) -> {per_record * big:,.0f} MiB for {big:,}")
        print(f"stage 01 on {big:,}: {results[big] - base:,.0f} MiB above its {base:,.0f} MiB of imports = "
              f"{(results[big] - base) / (per_record * big):.2f}x of merely holding the records")


if __name__ == "__main__":
    main()
