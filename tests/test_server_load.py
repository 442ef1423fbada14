"""``ftkit serve`` abused and loaded, on loopback only (issue 19): malformed HTTP over raw sockets, then
200 requests at 32 concurrency on a KV pool too small for all of them.

tests/test_serve.py already covers the OpenAI error shapes, non-numeric and negative Content-Length,
a missing one, a body shorter than its length, a silent client and a disconnect mid-stream; this
file adds what an abusive client does beyond that: oversized headers and bodies, bytes trickled to
hold a thread (slowloris), methods and request lines http.server answers itself, requests after
SIGTERM, and the server under load. Every test counts what it sent and what broke in the
reliability ledger (tests/reliability.py); ``make reliability`` prints the table.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import signal
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from reliability import tally

from ftkit.host.http_limits import MAX_BODY_BYTES, MAX_HEADER_BYTES
from ftkit.host.server_process import ServerProcess

pytestmark = pytest.mark.reliability
KEY = "abuse-key"
READ_TIMEOUT = 2.0
GOOD = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).encode()


def _head(length: int | None = None, extra: bytes = b"") -> bytes:
    cl = f"Content-Length: {length}\r\n".encode() if length is not None else b""
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY}\r\n".encode() + cl + extra + b"\r\n")


class Abused:
    """The server under abuse and what it answered: statuses seen, for the ledger."""

    def __init__(self, srv: ServerProcess, log):
        self.srv, self.log, self.statuses = srv, log, []

    def exchange(self, data: bytes, *, wait: float = 15.0) -> tuple[int | None, dict | None, float]:
        """Send ``data`` (all of it, or as much as the server takes before it answers); returns (status or
        None when closed unanswered, JSON body, seconds until the answer or the close)."""
        t0 = time.monotonic()
        with socket.create_connection((self.srv.host, self.srv.port), timeout=wait) as s:
            try:
                s.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server answered and closed before taking it all: read what it said
            raw = b""
            try:
                while chunk := s.recv(1 << 16):
                    raw += chunk
            except ConnectionResetError:
                pass
        elapsed = time.monotonic() - t0
        if not raw:
            self.statuses.append(None)
            return None, None, elapsed
        head, _, body = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        self.statuses.append(status)
        return status, json.loads(body) if body else None, elapsed

    def still_serves(self) -> None:
        conn = http.client.HTTPConnection(self.srv.host, self.srv.port, timeout=30)
        conn.request("POST", "/v1/chat/completions", GOOD, {"Authorization": f"Bearer {KEY}",
                                                           "Content-Type": "application/json"})
        r = conn.getresponse()
        body = json.loads(r.read())
        conn.close()
        self.statuses.append(r.status)
        assert r.status == 200 and body["choices"][0]["message"]["role"] == "assistant", body

    def crashed(self) -> int:
        died = self.srv.proc.poll() is not None and self.srv.proc.returncode != 0
        return int(died or "Traceback" in self.log.read_text())

    def tally(self) -> None:
        tally("abuse", requests=len(self.statuses), server_errors=sum(1 for s in self.statuses if s and s >= 500),
              crashes=self.crashed())
        assert not [s for s in self.statuses if s and s >= 500], self.statuses
        assert not self.crashed(), self.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def abused(tiny_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("abuse") / "server.log"
    srv = ServerProcess(tiny_path, api_key=KEY, log_path=log, extra_args=["--read-timeout", str(READ_TIMEOUT)]).start()
    yield Abused(srv, log)
    srv.stop()
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def _openai_error(body: dict, status: int, code: str | None = None) -> None:
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    if code:
        assert body["error"]["code"] == code, body


def test_oversized_headers_are_431(abused):
    """100 headers of 8 KB, one 70 KB header line, and 80 KB of 2 KB headers (over MAX_HEADER_BYTES in all):
    each 431 in OpenAI's shape, answered while the client still sends; then a normal request is served."""
    many = b"".join(f"X-Pad-{i}: ".encode() + b"a" * 8192 + b"\r\n" for i in range(100))
    status, body, _ = abused.exchange(_head(len(GOOD), many) + GOOD)
    assert status == 431, status
    _openai_error(body, 431, "headers_too_large")
    status, body, _ = abused.exchange(_head(len(GOOD), b"X-Long: " + b"a" * 70_000 + b"\r\n") + GOOD)
    assert status == 431, body
    _openai_error(body, 431, "headers_too_large")
    n = MAX_HEADER_BYTES // 2048 + 8
    total = b"".join(f"X-Pad-{i}: ".encode() + b"b" * 2048 + b"\r\n" for i in range(n))
    status, body, _ = abused.exchange(_head(len(GOOD), total) + GOOD)
    assert status == 431 and str(MAX_HEADER_BYTES) in body["error"]["message"], body
    # headers under the cap are fine
    status, body, _ = abused.exchange(_head(len(GOOD), b"X-Pad: " + b"c" * 8192 + b"\r\n") + GOOD)
    assert status == 200, body
    abused.still_serves()
    abused.tally()


def test_oversized_body_is_413_unread(abused):
    """A Content-Length over MAX_BODY_BYTES is answered 413 from the headers alone (well inside the read
    timeout, so the body is not waited for), and also when the 2 MB body comes with them."""
    status, body, elapsed = abused.exchange(_head(MAX_BODY_BYTES + 1))
    assert status == 413 and elapsed < READ_TIMEOUT, (status, elapsed)
    _openai_error(body, 413)
    assert str(MAX_BODY_BYTES) in body["error"]["message"]
    status, body, _ = abused.exchange(_head(2 * MAX_BODY_BYTES) + b"x" * (2 * MAX_BODY_BYTES))
    assert status == 413, status
    abused.still_serves()
    abused.tally()


def test_request_lines_and_methods_http_server_answers_itself(abused):
    """What http.server answers before ftkit's handler runs is JSON in OpenAI's shape too, never a 5xx:
    garbage request line 400, a request line over 64 KiB 414, DELETE/PUT 405 (http.server says 501)."""
    status, body, _ = abused.exchange(b"GARBAGE\r\n\r\n")
    assert status == 400, status
    _openai_error(body, 400, "bad_request")
    status, body, _ = abused.exchange(b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 414, status
    _openai_error(body, 414, "uri_too_long")
    for method in (b"DELETE", b"PUT", b"BREW"):
        status, body, _ = abused.exchange(method + b" /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert status == 405, (method, status)
        _openai_error(body, 405, "method_not_allowed")
    abused.still_serves()
    abused.tally()


def _slowloris(srv, stop: threading.Event, closed_after: list) -> None:
    """Trickle a request's headers one byte a second (each byte inside the per-read timeout); record when
    the server closed the connection."""
    data = _head(len(GOOD), b"X-Slow: " + b"z" * 200 + b"\r\n")
    with socket.create_connection((srv.host, srv.port), timeout=30) as s:
        t0 = time.monotonic()
        for byte in data:
            if stop.is_set():
                return
            try:
                s.sendall(bytes([byte]))
            except OSError:
                break
            readable, _, _ = select.select([s], [], [], 1.0)
            if readable:
                try:
                    if s.recv(4096) == b"":
                        break
                except ConnectionResetError:
                    break
        closed_after.append(time.monotonic() - t0)


def test_slowloris_is_cut_at_the_read_timeout(abused):
    """Eight clients trickling headers one byte a second: each connection is closed within the read
    timeout of its first byte (a per-read timeout alone would keep them for ever), and normal requests
    are served meanwhile, each in less than the read timeout."""
    stop, closed_after = threading.Event(), []
    threads = [threading.Thread(target=_slowloris, args=(abused.srv, stop, closed_after)) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        for _ in range(3):
            t0 = time.monotonic()
            abused.still_serves()
            assert time.monotonic() - t0 < READ_TIMEOUT
        for t in threads:
            t.join(timeout=READ_TIMEOUT + 10)
    finally:
        stop.set()
    assert len(closed_after) == 8, closed_after
    assert max(closed_after) < READ_TIMEOUT + 2.0, closed_after  # a byte a second: closed on time, not later
    abused.statuses += [None] * 8
    abused.still_serves()
    abused.tally()


def test_requests_after_sigterm_are_refused(abused):
    """SIGTERM with an idle keep-alive connection open: exit code 0, no traceback; afterwards a new
    connection is refused and the kept one is closed, not answered with a 5xx. Runs last: it stops the
    module's server."""
    srv = abused.srv
    keep = http.client.HTTPConnection(srv.host, srv.port, timeout=10)
    keep.request("GET", "/health")
    assert keep.getresponse().read()
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(30) == 0, abused.log.read_text()[-2000:]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((srv.host, srv.port), timeout=5)
    with pytest.raises((OSError, http.client.HTTPException)):
        keep.request("POST", "/v1/chat/completions", GOOD, {"Authorization": f"Bearer {KEY}"})
        keep.getresponse()
    abused.statuses += [200, None, None]
    assert "server stopped" in abused.log.read_text()
    abused.tally()


# --- load: 200 requests at 32 concurrency on a pool for 28 ----------------------------------------

LOAD_REQUESTS, LOAD_CONCURRENCY, LOAD_MAX_TOKENS, LOAD_ATTEMPTS = 200, 32, 48, 10
LOAD_KV_TOKENS = 3584
"""14 KV blocks of 256 tokens: each request (prompt and 48 tokens, under 256) holds one, and the engine
admits two pools' worth (engine.ADMIT_POOLS), so 28 of the 32 clients at most are in flight; the rest
are refused with 429 and try again after Retry-After, 10 attempts in all (the openai client takes
max_retries=9 for as many)."""
RSS_GROWTH_BOUND_MB = 64


def _rss_mb(pid: int) -> float:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except ImportError:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no RSS")


def _one(srv, i: int) -> dict:
    stream = i % 2 == 0
    body = json.dumps({"messages": [{"role": "user", "content": f"Order AC-{100000 + i}: where is it?"}],
                       "max_tokens": LOAD_MAX_TOKENS, "stream": stream}).encode()
    t0 = time.perf_counter()
    row = {"i": i, "stream": stream}
    try:
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=120)
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        conn.close()
    except (OSError, http.client.HTTPException) as e:
        return {**row, "status": None, "error": repr(e), "seconds": time.perf_counter() - t0}
    row.update(status=r.status, seconds=time.perf_counter() - t0, retry_after=r.getheader("Retry-After"))
    if r.status != 200:
        row["body"] = json.loads(data)
        return row
    if stream:
        events = [line[6:] for line in data.decode().split("\n") if line.startswith("data: ")]
        chunks = [json.loads(e) for e in events[:-1]]
        row["complete"] = (events[-1] == "[DONE]" and all("error" not in c for c in chunks)
                           and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length"))
    else:
        choice = json.loads(data)["choices"][0]
        row["complete"] = isinstance(choice["message"]["content"], str) and choice["finish_reason"] in ("stop", "length")
    return row


@pytest.mark.slow
def test_200_requests_at_32_concurrency(smollm_path, tmp_path):
    """200 requests (half streamed) from 32 clients on a KV pool that admits 24: each is 200 with a whole
    answer (streams end with a finish_reason and [DONE]) or 429 in OpenAI's shape with Retry-After;
    none is a 5xx or unanswered; the server's RSS after the run is within RSS_GROWTH_BOUND_MB of after
    warm-up; p50/p95 latency printed and written to outputs/test-artifacts/server_load.json."""
    log = tmp_path / "server.log"
    with ServerProcess(smollm_path, log_path=log, extra_args=["--max-tokens-cap", "64", "--kv-cache-tokens",
                                                            str(LOAD_KV_TOKENS)]) as srv:
        pid = srv.proc.pid
        rss = {"start": _rss_mb(pid)}
        for i in range(8):  # warm-up: both paths, first-request costs out of the figures
            assert _one(srv, i)["status"] == 200
        rss["warm"] = _rss_mb(pid)
        pending = iter(range(LOAD_REQUESTS))
        lock, rows, attempts = threading.Lock(), [], []

        def client() -> None:
            while True:
                with lock:
                    i = next(pending, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                for attempt in range(LOAD_ATTEMPTS):
                    row = _one(srv, i)
                    with lock:
                        attempts.append(row)
                    if row["status"] != 429 or attempt == LOAD_ATTEMPTS - 1:
                        break
                    time.sleep(min(float(row["retry_after"] or 1), 5))  # a client that honours Retry-After
                with lock:
                    rows.append({**row, "seconds": time.perf_counter() - t0, "attempts": attempt + 1})

        t0 = time.perf_counter()
        with ThreadPoolExecutor(LOAD_CONCURRENCY) as pool:
            for f in [pool.submit(client) for _ in range(LOAD_CONCURRENCY)]:
                f.result()
        wall = time.perf_counter() - t0
        rss["end"] = _rss_mb(pid)
        alive = srv.proc.poll() is None
    statuses = [r["status"] for r in attempts]
    ok = [r for r in rows if r["status"] == 200]
    refused = [r for r in attempts if r["status"] == 429]
    lat = sorted(r["seconds"] for r in ok)
    figures = {
        "model": os.path.basename(smollm_path), "requests": len(rows), "attempts": len(attempts),
        "concurrency": LOAD_CONCURRENCY, "kv_cache_tokens": LOAD_KV_TOKENS,
        "answered_200": len(ok), "refused_in_the_end": len(rows) - len(ok), "retried": sum(r["attempts"] > 1 for r in rows),
        "attempts_429": len(refused), "attempts_503": statuses.count(503),
        "attempts_other": len(attempts) - statuses.count(200) - len(refused) - statuses.count(503),
        "p50_s": round(statistics.median(lat), 3), "p95_s": round(lat[int(0.95 * (len(lat) - 1))], 3),
        "wall_s": round(wall, 1), "rss_mb": {k: round(v, 1) for k, v in rss.items()},
    }
    out = os.path.join(os.path.dirname(__file__), "..", "outputs", "test-artifacts", "server_load.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(figures, f, indent=2)
    print(f"\nserver load: {json.dumps(figures)}")
    # an unanswered request or a 200 without a whole answer counts as a 5xx: as bad for the client
    server_errors = (sum(1 for s in statuses if s is None or s >= 500)
                     + sum(1 for r in attempts if r["status"] == 200 and not r["complete"]))
    crashes = int(not alive or "Traceback" in log.read_text())
    tally("load", requests=len(attempts), server_errors=server_errors, crashes=crashes)

    assert len(rows) == LOAD_REQUESTS
    assert server_errors == 0, [r for r in attempts if r["status"] not in (200, 429)][:5]
    assert crashes == 0, log.read_text()[-3000:]
    assert set(statuses) <= {200, 429} and all(r["complete"] for r in ok)
    assert refused, "the pool admits 28 of 32 clients: some attempts must have been refused"
    assert len(ok) >= LOAD_REQUESTS // 2, figures
    for r in refused:
        _openai_error(r["body"], 429, "kv_pool_full")
        assert r["retry_after"] and float(r["retry_after"]) > 0
    assert rss["end"] - rss["warm"] < RSS_GROWTH_BOUND_MB, figures
