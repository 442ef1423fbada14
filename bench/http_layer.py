"""ftkit's HTTP layer (``http.server``, ftkit/host/serve.py) against Starlette + uvicorn + sse-starlette.

Both serve the same two things with no model behind them, so only the HTTP layer is measured: a
trivial JSON endpoint (``GET /health``) and an SSE stream of 32 chat-completion chunks (``POST
/v1/chat/completions`` with ``"stream": true``, its JSON body read and checked). ftkit's side is its
real :class:`ftkit.host.serve.Handler` over a stand-in generator; the ASGI side is the app a port
would be (Starlette routes, sse-starlette's ``EventSourceResponse``), under uvicorn with h11 (what
``pip install uvicorn`` gives) and with httptools + uvloop (``uvicorn[standard]``). Each server runs
in its own process; the load comes from client threads on keep-alive connections in this one
(loopback, the same 2 cores, so the figures are ratios measured in one run, not capacities).

Then the malformed-HTTP cases of issue 19 against each: negative Content-Length, 100 headers of
8 KB, one 70 KB header line, a 2 MB body (answered before it is sent?), a client trickling its
headers a byte a second (when is it cut?), and the memory of 200 idle connections::

    .venv/bin/python bench/http_layer.py            # ~2 min on 2 cores; needs starlette uvicorn sse-starlette
"""

from __future__ import annotations

import http.client
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import threading
import time

CHUNKS = 32
BODY = json.dumps({"model": "bench", "stream": True, "max_tokens": 32,
                   "messages": [{"role": "user", "content": "Hi"}]}).encode()


# --- the servers ------------------------------------------------------------------------------

class _FakeGen:
    """What Handler needs of a Generator, producing CHUNKS pieces at once."""
    name, in_flight, reasoning, max_tokens_cap, max_sequence_tokens = "bench", 0, None, 512, 2048

    def encode_chat(self, messages):
        return [1, 2, 3]

    def opens_inside(self, ids):
        return False

    def check_budget(self, ids, n):
        pass

    def stream(self, ids, body, n, done):
        done.update(finish_reason="length", token_ids=list(range(CHUNKS)))
        return (piece for piece in ["tok "] * CHUNKS)


def serve_ftkit(port: int) -> None:
    from ftkit.host.http_limits import Server
    from ftkit.host.serve import Handler

    handler = type("BenchHandler", (Handler,), {"gen": _FakeGen(), "api_key": None, "timeout": 10.0})
    Server(("127.0.0.1", port), handler).serve_forever()


def asgi_app():
    from sse_starlette.sse import EventSourceResponse
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": "bench", "requests_in_flight": 0})

    async def chat(request: Request):
        body = await request.body()
        try:
            req = json.loads(body)
        except json.JSONDecodeError as e:
            return JSONResponse({"error": {"message": f"not valid JSON: {e}", "type": "invalid_request_error",
                                           "param": None, "code": None}}, status_code=400)

        async def events():
            for i in range(CHUNKS + 1):
                yield {"data": json.dumps({"id": "c", "object": "chat.completion.chunk", "model": "bench", "choices": [
                    {"index": 0, "delta": {"content": "tok "} if i < CHUNKS else {},
                     "finish_reason": None if i < CHUNKS else "length"}]})}
            yield {"data": "[DONE]"}

        assert req.get("stream")
        return EventSourceResponse(events(), ping=None)

    return Starlette(routes=[Route("/health", health), Route("/v1/chat/completions", chat, methods=["POST"])])


def serve_uvicorn(port: int, http_impl: str) -> None:
    import uvicorn

    uvicorn.run(asgi_app(), host="127.0.0.1", port=port, log_level="error", http=http_impl,
                loop="uvloop" if http_impl == "httptools" else "asyncio")


SERVERS = {"ftkit http.server": ["ftkit"], "uvicorn h11": ["uvicorn", "h11"],
           "uvicorn httptools+uvloop": ["uvicorn", "httptools"]}


def start(name: str) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port), *SERVERS[name]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{name} did not start")


# --- load -------------------------------------------------------------------------------------

def load(port: int, stream: bool, concurrency: int, requests: int) -> dict:
    lat: list[float] = []
    errors = []
    lock = threading.Lock()
    per = requests // concurrency

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for _ in range(per):
            t0 = time.perf_counter()
            try:
                if stream:
                    conn.request("POST", "/v1/chat/completions", BODY, {"Content-Type": "application/json"})
                else:
                    conn.request("GET", "/health")
                r = conn.getresponse()
                data = r.read()
                if r.status != 200 or (stream and not data.rstrip().endswith(b"[DONE]")):
                    raise RuntimeError(f"{r.status} {data[-60:]!r}")
                if r.getheader("Connection", "").lower() == "close" or r.will_close:
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            except Exception as e:  # noqa: BLE001
                with lock:
                    errors.append(repr(e))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                continue
            with lock:
                lat.append(time.perf_counter() - t0)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    return {"rps": len(lat) / wall, "p50_ms": 1000 * statistics.median(lat),
            "p95_ms": 1000 * lat[int(0.95 * (len(lat) - 1))], "errors": len(errors)}


# --- abuse ------------------------------------------------------------------------------------

def exchange(port: int, data: bytes, wait: float = 10) -> tuple[str, float]:
    """Status line (or what happened) and seconds until it came."""
    t0 = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
            try:
                s.sendall(data)
            except OSError:
                pass
            raw = b""
            try:
                while b"\r\n" not in raw and (chunk := s.recv(65536)):
                    raw += chunk
            except ConnectionResetError:
                return ("reset" if not raw else raw.split(b"\r\n")[0].decode()), time.monotonic() - t0
            except TimeoutError:
                return f"no answer in {wait:.0f} s", time.monotonic() - t0
    except OSError as e:
        return repr(e), time.monotonic() - t0
    line = raw.split(b"\r\n")[0].decode(errors="replace")
    return (" ".join(line.split(" ")[1:2]) or "closed unanswered"), time.monotonic() - t0


def head(length, extra: bytes = b"") -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {length}\r\n".encode() + extra + b"\r\n")


def slowloris(port: int, limit: float = 20.0) -> str:
    data = head(len(BODY), b"X-Slow: " + b"z" * 400 + b"\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        t0 = time.monotonic()
        for byte in data:
            if time.monotonic() - t0 > limit:
                return f"still open after {limit:.0f} s"
            try:
                s.sendall(bytes([byte]))
            except OSError:
                return f"cut after {time.monotonic() - t0:.1f} s"
            if select.select([s], [], [], 1.0)[0]:
                try:
                    got = s.recv(4096)
                except ConnectionResetError:
                    got = b""
                what = got.split(b"\r\n")[0].decode(errors="replace").split(" ")[1:2] if got else []
                return f"cut after {time.monotonic() - t0:.1f} s" + (f" ({what[0]})" if what else "")
    return "headers all sent"


def rss_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def idle_memory(proc, port: int, n: int = 200) -> float:
    before = rss_kb(proc.pid)
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # one request, then idle on keep-alive
        socks.append(s)
    time.sleep(1.0)
    after = rss_kb(proc.pid)
    for s in socks:
        s.close()
    return (after - before) / n


def abuse(proc, port: int) -> dict:
    return {
        "negative Content-Length": exchange(port, head(-5) + BODY)[0],
        "100 headers x 8 KB": exchange(port, head(len(BODY), b"".join(
            f"X-Pad-{i}: ".encode() + b"a" * 8192 + b"\r\n" for i in range(100))) + BODY)[0],
        "one 70 KB header": exchange(port, head(len(BODY), b"X-Long: " + b"a" * 70_000 + b"\r\n") + BODY)[0],
        "2 MB body, headers only": "{} in {:.1f} s".format(*exchange(port, head(2 << 20), wait=12)),
        "2 MB body sent": exchange(port, head(2 << 20) + b"x" * (2 << 20))[0],
        "slowloris (1 byte/s)": slowloris(port),
        "KB per idle connection": f"{idle_memory(proc, port):.0f}",
    }


def main() -> int:
    results = {}
    levels = ((1, 400), (32, 1600), (64, 1600))
    for name in SERVERS:
        proc, port = start(name)
        try:
            load(port, False, 4, 200)  # warm-up
            row = {}
            for stream in (False, True):
                for c, n in levels:
                    row[("sse" if stream else "json", c)] = load(port, stream, c, n)
            row["abuse"] = abuse(proc, port)
            results[name] = row
        finally:
            proc.terminate()
            proc.wait(10)
        print(f"measured {name}", file=sys.stderr)

    base = results["ftkit http.server"]
    print(f"\n{'endpoint':<6} {'conc':>4}  " + "  ".join(f"{n:>42}" for n in results))
    print(f"{'':<6} {'':>4}  " + "  ".join(f"{'req/s (x base)   p50 ms   p95 ms  err':>42}" for _ in results))
    for kind in ("json", "sse"):
        for c, _ in levels:
            cells = []
            for r in results.values():
                m, b = r[(kind, c)], base[(kind, c)]
                cells.append(f"{m['rps']:7.0f} ({m['rps'] / b['rps']:4.2f}x) {m['p50_ms']:8.1f} {m['p95_ms']:8.1f} {m['errors']:4d}")
            print(f"{kind:<6} {c:>4}  " + "  ".join(f"{x:>42}" for x in cells))
    print()
    for case in base["abuse"]:
        print(f"{case:<26}" + "  ".join(f"{str(r['abuse'][case]):>28}" for r in results.values()))
    print(f"{'':<26}" + "  ".join(f"{n:>28}" for n in results))
    out = os.path.join(os.path.dirname(__file__), "results", time.strftime("%Y-%m-%d") + "-http-layer.json")
    with open(out, "w") as f:
        json.dump({n: {(k if isinstance(k, str) else f"{k[0]}@{k[1]}"): v for k, v in r.items()}
                   for n, r in results.items()}, f, indent=2)
    print(f"\nwritten to {os.path.relpath(out)}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        port, kind = int(sys.argv[2]), sys.argv[3]
        if kind == "ftkit":
            serve_ftkit(port)
        else:
            serve_uvicorn(port, sys.argv[4])
        sys.exit(0)
    sys.exit(main())
