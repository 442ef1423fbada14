"""Run ``ftkit`` and SIGKILL it at an exact point of its writing: the reliability tests' fault injector.

    python tests/killer.py PATTERN K -- run params.yaml --stages 01      # killed at the K-th commit
    python tests/killer.py PATTERN 0 --log FILE -- run ...                # not killed: commits listed

Every output ftkit writes is committed by one rename (``ftkit.core.files.atomic``); this wraps that
module's ``os.replace`` so the process kills itself with SIGKILL just before the K-th rename whose
destination's name matches the glob PATTERN: the new file or folder is complete under its temporary
name, the old one still in place, exactly what a power cut or the OOM killer leaves at that moment.
Nothing in ftkit is changed for this (the wrapper is test code); with K=0 the commits are only listed,
one destination per line, so a test can sweep every point.
"""

from __future__ import annotations

import fnmatch
import os
import signal
import sys
from pathlib import Path


class _Os:
    """``os`` as ftkit.core.files sees it, with ``replace`` counted (and fatal at the K-th match)."""

    def __init__(self, pattern: str, k: int, log: str | None):
        self._pattern, self._k, self._log, self._seen = pattern, k, log, 0

    def __getattr__(self, name):
        return getattr(os, name)

    def replace(self, src, dst):
        if fnmatch.fnmatch(Path(dst).name, self._pattern):
            self._seen += 1
            if self._log:
                with open(self._log, "a", encoding="utf-8") as f:
                    f.write(f"{dst}\n")
            if self._seen == self._k:
                os.kill(os.getpid(), signal.SIGKILL)
        return os.replace(src, dst)


def main(argv: list[str]) -> int:
    split = argv.index("--")
    head, args = argv[:split], argv[split + 1:]
    log = None
    if "--log" in head:
        i = head.index("--log")
        log = head[i + 1]
        del head[i:i + 2]
    pattern, k = head[0], int(head[1])
    import ftkit.core.files as files
    from ftkit import cli

    files.os = _Os(pattern, k, log)
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
