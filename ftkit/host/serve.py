"""An OpenAI-compatible HTTP server for a merged model (or a base model + LoRA adapter).

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions`` (streaming over
server-sent events with ``"stream": true``) and ``POST /v1/completions``. Chat prompts are built by
:func:`ftkit.core.masking.encode_prompt`, the function that rendered the training data, and generation
stops on the chat template's end-of-turn token, so the server serves what was trained. With
``"return_token_ids": true`` (vLLM's extension) a response also carries ``prompt_token_ids`` and the
choice's ``token_ids``: stage 05's consistency check compares those with the training tokens.

Generation: transformers' continuous batching (``model.init_continuous_batching``), which batches
concurrent requests into shared forward passes; see :class:`Generator`. The HTTP layer is ours,
not ``transformers serve``: run on the demo model (5.24, CPU, offline) it served a local directory
but took requests without a key (it has none, and binds wherever asked), accepted
``max_tokens: 100000`` and answered a prompt longer than the model's context with 200 and garbage
after 98 s; its errors are FastAPI's ``{"detail": ...}``, not OpenAI's shape; it renders prompts in
its own handler, not the function that built the training data; and it needs FastAPI + uvicorn.
What it would add over this module is HTTP plumbing; the engine is the same. See the README,
"Serving, exports and cost".

Safety: binds to 127.0.0.1 by default and refuses any other address without an API key; keys
are compared in constant time; malformed JSON, unknown models, oversized prompts and
``max_tokens`` above the cap get 4xx errors in OpenAI's error shape, and so does a bad or missing
Content-Length; a request (its line, headers and body) must arrive whole within :data:`~ftkit.host.http_limits.READ_TIMEOUT_S`
of its first byte, and an idle connection is closed after as long, so a client trickling bytes
(slowloris) holds a thread for that long at most; headers over :data:`MAX_HEADER_BYTES` in all, or a line
over 64 KiB, get 431; a body over :data:`MAX_BODY_BYTES` gets 413 unread; every error, http.server's own
too, is JSON in OpenAI's shape; when the KV pool and its waiting room are taken a request gets 429 with
``Retry-After`` (:meth:`Generator._admit`); a client that disconnects mid-stream has its request cancelled
in the engine; SIGTERM stops the engine and closes the socket. Measured against Starlette + uvicorn in
bench/http_layer.py; docs/serving-http.md says why this layer stays.
"""

from __future__ import annotations

import hmac
import io
import ipaddress
import json
import logging
import signal
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ftkit.core import reasoning
from ftkit.host.engine import APIError, Generator
from ftkit.host.http_limits import (
    LINGER_BYTES,
    LINGER_S,
    MAX_BODY_BYTES,
    MAX_HEADER_BYTES,
    READ_TIMEOUT_S,
    DeadlineReader,
    HeaderLines,
    Server,
)

log = logging.getLogger("ftkit")
def _completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class Handler(BaseHTTPRequestHandler):
    server_version = "ftkit"
    protocol_version = "HTTP/1.1"

    # set on the class by make_server
    gen: Generator
    api_key: str | None = None
    timeout = READ_TIMEOUT_S  # socketserver applies it to the connection's socket (reads and writes)
    # TCP_NODELAY: headers and body go out as two writes, and Nagle held the second until the client's
    # delayed ACK, 40 ms on every keep-alive answer (bench/http_layer.py: 44 ms p50 for /health); SSE
    # events are small writes too
    disable_nagle_algorithm = True

    def log_message(self, fmt, *args):  # route access logs through logging
        log.info("%s %s", self.address_string(), fmt % args)

    # -- reading: one deadline per request, headers bounded ------------------------------------
    def setup(self) -> None:
        super().setup()
        self._reader = DeadlineReader(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self._reader)

    def finish(self) -> None:
        super().finish()
        if getattr(self, "_linger", False):  # an answer sent over unread input: let the client read it
            try:
                self.connection.shutdown(socket.SHUT_WR)
                end, dropped = time.monotonic() + LINGER_S, 0
                while dropped < LINGER_BYTES and (left := end - time.monotonic()) > 0:
                    self.connection.settimeout(left)
                    chunk = self.connection.recv(1 << 16)
                    if not chunk:
                        break
                    dropped += len(chunk)
            except OSError:
                pass

    def _request_read(self) -> None:
        """The request is in: writes get the plain timeout again, with no deadline."""
        self._reader.deadline = None
        self.connection.settimeout(self.timeout)

    def handle_one_request(self) -> None:
        self._request_read()
        try:
            if not self.rfile.peek(1):  # idle: one read timeout for the next request to begin
                self.close_connection = True
                return
            self._reader.deadline = time.monotonic() + self.timeout
            super().handle_one_request()
        except TimeoutError:
            log.info("%s: connection idle, or its request not whole, for %.0f s: closed", self.address_string(),
                     self.timeout)
            self.close_connection = True
        except (ConnectionResetError, BrokenPipeError):
            self.close_connection = True

    def parse_request(self) -> bool:
        rfile, self.rfile = self.rfile, HeaderLines(self.rfile, MAX_HEADER_BYTES)
        try:
            return super().parse_request()
        finally:
            self.rfile = rfile

    def send_error(self, code, message=None, explain=None) -> None:
        """http.server's own errors (request line, headers, methods) as JSON in OpenAI's shape, not HTML."""
        self._request_read()
        if self.request_version == "HTTP/0.9":  # a request line too broken to name a version: answer with headers
            self.request_version = "HTTP/1.0"
        if code == 501:  # an unsupported method is not the server failing
            code, message = 405, f"method {self.command!r} not allowed: this server takes GET and POST"
        short, long_ = self.responses.get(code, ("error", ""))
        text = "; ".join(x for x in (message or short, explain if explain and explain != long_ else None) if x)
        self.log_error("code %d, message %s", code, text)
        self._linger = True  # the rest of the request line or headers is unread
        self._send_json(code, APIError(code, text, code={400: "bad_request", 405: "method_not_allowed", 414: "uri_too_long",
                                                         431: "headers_too_large"}.get(code)).body(),
                        close=True, extra={"Allow": "GET, POST"} if code == 405 else None)

    def _send_json(self, status: int, body: dict, close: bool = False, extra: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        if close:
            self.send_header("Connection", "close")  # also makes the handler close the connection
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        if not self.api_key:
            return True
        given = self.headers.get("Authorization", "")
        token = given[7:] if given.startswith("Bearer ") else ""
        return hmac.compare_digest(token.encode(), self.api_key.encode())

    def _handle(self, fn) -> None:
        self._body_read = self.command != "POST"
        try:
            if self.path != "/health" and not self._authorised():
                raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                               "authentication_error", code="invalid_api_key")
            fn()
        except APIError as e:
            # a body left unread would be parsed as the next request: close the connection instead
            self._request_read()
            self._linger = not self._body_read
            self._send_json(e.status, e.body(), close=not self._body_read, extra=e.headers)
        except (BrokenPipeError, ConnectionResetError):
            log.info("client disconnected")
        except TimeoutError:  # a write to a client that stopped reading
            log.info("client stopped reading for %.0f s: connection closed", self.timeout)
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - a server answers rather than dies
            log.exception("request failed")
            self._request_read()
            self._send_json(500, APIError(500, f"internal error: {e}", "server_error").body(), close=not self._body_read)

    def do_GET(self):
        self._request_read()
        self._handle(self._get)

    def do_POST(self):
        self._handle(self._post)

    def _get(self):
        if self.path == "/health":
            self._send_json(200, {"status": "ok", "model": self.gen.name, "requests_in_flight": self.gen.in_flight})
        elif self.path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [
                {"id": self.gen.name, "object": "model", "created": 0, "owned_by": "ftkit"}]})
        else:
            raise APIError(404, f"no route GET {self.path}", code="not_found")

    def _body_length(self) -> int:
        """The request's Content-Length, checked: digits only (no sign, no ``1_000``), one value, at most
        :data:`MAX_BODY_BYTES`; a POST without one is answered 411 (chunked bodies are not read)."""
        values = self.headers.get_all("Content-Length") or []
        if not values or self.headers.get("Transfer-Encoding"):
            raise APIError(411, "Content-Length is required: send the JSON body with a Content-Length header "
                                "(chunked request bodies are not supported)", code="length_required")
        if len(set(v.strip() for v in values)) > 1:
            raise APIError(400, f"conflicting Content-Length headers: {', '.join(values)}", code="invalid_content_length")
        value = values[0].strip()
        if value.startswith("-") and value[1:].isascii() and value[1:].isdigit():
            raise APIError(400, f"Content-Length must not be negative, got {value}", code="invalid_content_length")
        if not (value.isascii() and value.isdigit()):
            raise APIError(400, f"Content-Length must be a whole number of bytes, got {value!r}",
                           code="invalid_content_length")
        length = int(value)
        if length > MAX_BODY_BYTES:
            raise APIError(413, f"request body of {length} bytes exceeds {MAX_BODY_BYTES}")
        return length

    def _read_body(self) -> bytes:
        length = self._body_length()
        try:
            data = self.rfile.read(length)
        except TimeoutError:
            raise APIError(400, f"request body ended before its Content-Length of {length} bytes (the request "
                                f"was not whole {self.timeout:.0f} s after it began)", code="incomplete_body") from None
        finally:
            self._request_read()
        if len(data) < length:  # the client closed its side
            raise APIError(400, f"request body ended after {len(data)} of its Content-Length of {length} bytes",
                           code="incomplete_body")
        self._body_read = True
        return data

    def _read_json(self) -> dict:
        data = self._read_body()
        try:
            body = json.loads(data or b"")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        model = body.get("model")
        if model not in (None, self.gen.name):
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{self.gen.name}'",
                           param="model", code="model_not_found")
        return body

    def _post(self):
        if self.path == "/v1/chat/completions":
            body = self._read_json()
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in messages):
                raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
            self._complete(body, self.gen.encode_chat(messages), chat=True)
        elif self.path == "/v1/completions":
            body = self._read_json()
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise APIError(400, "'prompt' must be a string", param="prompt")
            self._complete(body, self.gen.encode_text(prompt), chat=False)
        else:
            raise APIError(404, f"no route POST {self.path}", code="not_found")

    def _complete(self, body: dict, prompt_ids: list[int], chat: bool) -> None:
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if max_tokens is None:  # not asked for: as much as fits, up to 256 and the cap
            max_tokens = max(1, min(256, self.gen.max_tokens_cap, self.gen.max_sequence_tokens - len(prompt_ids)))
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
            raise APIError(400, f"max_tokens must be an integer, got {max_tokens!r}", param="max_tokens")
        if body.get("n", 1) != 1:
            raise APIError(400, f"n={body.get('n')!r}: this server returns one choice per request; send n=1",
                           param="n")
        self.gen.check_budget(prompt_ids, max_tokens)
        cid, created = _completion_id("chatcmpl" if chat else "cmpl"), int(time.time())
        # vLLM's extension: the token ids the model was given and produced (the consistency check reads them)
        ids_wanted = bool(body.get("return_token_ids"))
        if body.get("stream"):
            self._stream(body, prompt_ids, max_tokens, cid, created, chat, ids_wanted)
            return
        text, finish, token_ids = self.gen.generate(prompt_ids, body, max_tokens)
        n = len(token_ids)
        if chat:
            message = {"role": "assistant", "content": text}
            if self.gen.reasoning:
                thought, answer = reasoning.split(text, self.gen.reasoning, self.gen.opens_inside(prompt_ids))
                message.update(content=answer, reasoning_content=thought)
            choice = {"index": 0, "message": message, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        resp = {"id": cid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": self.gen.name, "choices": [choice],
                "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": n,
                          "total_tokens": len(prompt_ids) + n}}
        if ids_wanted:
            resp["prompt_token_ids"] = prompt_ids
            choice["token_ids"] = token_ids
        self._send_json(200, resp)

    def _stream(self, body, prompt_ids, max_tokens, cid, created, chat, ids_wanted=False) -> None:
        done: dict = {}
        pieces = self.gen.stream(prompt_ids, body, max_tokens, done)  # queued now: errors are still plain 4xx/5xx
        try:
            self._stream_events(pieces, done, prompt_ids, cid, created, chat, ids_wanted)
        finally:
            pieces.close()  # a client that went away: the engine drops the request

    def _stream_events(self, pieces, done, prompt_ids, cid, created, chat, ids_wanted) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        obj = "chat.completion.chunk" if chat else "text_completion"

        splitter = reasoning.Splitter(self.gen.reasoning if chat else None, chat and self.gen.opens_inside(prompt_ids))

        def event(delta_text: str | None, finish: str | None, first: bool = False, extra: dict | None = None,
                  kind: str = "content") -> None:
            if chat:
                key = "reasoning_content" if kind == "reasoning" else "content"
                delta = {"role": "assistant", "content": ""} if first else ({key: delta_text} if delta_text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta_text or "", "finish_reason": finish}
            chunk = {"id": cid, "object": obj, "created": created, "model": self.gen.name, "choices": [choice],
                     **(extra or {})}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        try:
            if chat:
                event(None, None, first=True, extra={"prompt_token_ids": prompt_ids} if ids_wanted else None)
            for piece in pieces:
                for kind, text in splitter.feed(piece):
                    event(text, None, kind=kind)  # a disconnect raises here
            for kind, text in splitter.finish():
                event(text, None, kind=kind)
        except APIError as e:  # headers are sent: report the error as a last event
            self.wfile.write(f"data: {json.dumps(e.body())}\n\n".encode())
            return
        n = len(done.get("token_ids", []))
        extra = {"usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": n,
                           "total_tokens": len(prompt_ids) + n}}
        if ids_wanted:
            extra["token_ids"] = done.get("token_ids", [])
        event(None, done.get("finish_reason", "length"), extra=extra)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_server(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                max_tokens_cap: int = 512, name: str | None = None, *, max_prompt_tokens: int | None = None,
                kv_cache_tokens: int | None = None, threads: int | None = None,
                read_timeout: float = READ_TIMEOUT_S, **engine) -> ThreadingHTTPServer:
    if not is_loopback(host) and not api_key:
        raise ValueError(f"refusing to bind to {host} without an API key: pass --api-key (or bind to 127.0.0.1)")
    gen = Generator(model_dir, name=name, max_tokens_cap=max_tokens_cap, max_prompt_tokens=max_prompt_tokens,
                    kv_cache_tokens=kv_cache_tokens, threads=threads, **engine)  # attention, cuda_graphs, ...
    handler = type("BoundHandler", (Handler,), {"gen": gen, "api_key": api_key, "timeout": read_timeout})
    try:
        server = Server((host, port), handler)
    except OSError:
        gen.close()
        raise
    return server


def serve_forever(server: ThreadingHTTPServer) -> None:
    """Serve until SIGTERM/SIGINT, then stop the engine and close the socket cleanly."""
    def stop(signum, frame):
        log.info("signal %s: shutting down", signum)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = server.server_address[:2]
    gen = server.RequestHandlerClass.gen
    print(f"ftkit serving {gen.name} on http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        gen.close()
        print("ftkit server stopped", flush=True)
