"""Run ``ftkit serve`` in a background process (for notebooks and tests) and stop it cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the server's process before exec (Linux): SIGTERM when the process that started it dies, by
    SIGKILL too. A stage killed mid-run (the OOM killer, a power-cut test) would otherwise leave its
    server running, holding the port and the model's memory, with nobody to stop it."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ServerProcess:
    """``with ServerProcess(model_dir) as srv: srv.base_url`` — started, healthy, then stopped."""

    def __init__(self, model_dir: str | Path, *, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                 log_path: str | Path | None = None, startup_timeout: float = 180.0, extra_args: list[str] = ()):
        self.model_dir, self.host, self.api_key = Path(model_dir), host, api_key
        self.port = port or free_port(host)
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> ServerProcess:
        cmd = [sys.executable, "-m", "ftkit", "serve", str(self.model_dir), "--host", self.host, "--port", str(self.port),
               *self.extra_args]
        env = dict(os.environ, FTKIT_API_KEY=self.api_key or "")
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text()[-2000:] if self.log_path else ""
                raise RuntimeError(f"server exited with code {self.proc.returncode} during start-up\n{tail}")
            if self.healthy():
                return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"server on port {self.port} not healthy after {self.startup_timeout:.0f}s")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.port}/health", timeout=2) as r:
                return json.load(r).get("status") == "ok"
        except OSError:
            return False

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait; returns the exit code (0 for a clean shutdown)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
