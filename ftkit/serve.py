"""An OpenAI-compatible HTTP server for a merged model (or a base model + LoRA adapter).

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions`` (streaming over
server-sent events with ``"stream": true``) and ``POST /v1/completions``. Prompts are rendered
with :func:`ftkit.masking.render`, the very function that built the training data, and
generation stops on the chat template's end-of-turn token, so the server serves what was trained.

Safety: binds to 127.0.0.1 by default and refuses any other address without an API key; keys
are compared in constant time; malformed JSON, unknown models, oversized prompts and
``max_tokens`` above the cap get 4xx errors in OpenAI's error shape. Requests are generated one
at a time (a lock), which is right for one small model on one device.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import signal
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from .config import ModelConfig
from .masking import render
from .modeling import load_tokenizer, resolve_device, stop_token_ids

log = logging.getLogger("ftkit")
MAX_BODY_BYTES = 1 << 20


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Generator:
    """Loads the model once and generates replies, one request at a time."""

    def __init__(self, model_dir: str | Path, *, name: str | None = None, max_tokens_cap: int = 512,
                 device: str = "auto"):
        from transformers import AutoModelForCausalLM

        model_dir = Path(model_dir)
        self.name = name or model_dir.name
        self.max_tokens_cap = max_tokens_cap
        dev = resolve_device(ModelConfig(device=device))
        self.tokenizer = load_tokenizer(str(model_dir))
        if (model_dir / "adapter_config.json").exists():
            from peft import AutoPeftModelForCausalLM as loader
        else:
            loader = AutoModelForCausalLM
        self.model = loader.from_pretrained(str(model_dir), dtype="auto").to(dev).eval()
        self.stop_ids = stop_token_ids(self.tokenizer)
        self.context_len = getattr(self.model.config, "max_position_embeddings", 2048)
        self.lock = threading.Lock()

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.tokenizer(render(self.tokenizer, messages, add_generation_prompt=True),
                              add_special_tokens=False)["input_ids"]

    def check_budget(self, prompt_ids: list[int], max_tokens: int) -> None:
        if max_tokens < 1 or max_tokens > self.max_tokens_cap:
            raise APIError(400, f"max_tokens must be between 1 and {self.max_tokens_cap}, got {max_tokens}",
                           param="max_tokens")
        if len(prompt_ids) + max_tokens > self.context_len:
            raise APIError(400, f"prompt has {len(prompt_ids)} tokens; with max_tokens={max_tokens} that exceeds "
                                f"the model's context of {self.context_len} tokens", param="messages",
                           code="context_length_exceeded")

    def _kwargs(self, req: dict, max_tokens: int, stop_flag: threading.Event | None) -> dict:
        from transformers import StoppingCriteria, StoppingCriteriaList

        temperature = float(req.get("temperature") or 0.0)
        kw = {"max_new_tokens": max_tokens, "eos_token_id": self.stop_ids, "pad_token_id": self.tokenizer.pad_token_id}
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_p=float(req.get("top_p", 1.0)))
        else:
            kw.update(do_sample=False)
        if stop_flag is not None:
            class _Stop(StoppingCriteria):
                def __call__(self, input_ids, scores, **kwargs):
                    return stop_flag.is_set()
            kw["stopping_criteria"] = StoppingCriteriaList([_Stop()])
        return kw

    def generate(self, prompt_ids: list[int], req: dict, max_tokens: int) -> tuple[str, str, int]:
        """(text, finish_reason, completion_tokens)."""
        with self.lock, torch.no_grad():
            if req.get("seed") is not None:
                torch.manual_seed(int(req["seed"]))
            ids = torch.tensor([prompt_ids], device=self.model.device)
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      **self._kwargs(req, max_tokens, None))[0, len(prompt_ids):].tolist()
        finish = "length"
        for k, t in enumerate(out):
            if t in self.stop_ids:
                out, finish = out[:k], "stop"
                break
        return self.tokenizer.decode(out, skip_special_tokens=True), finish, len(out)

    def stream(self, prompt_ids: list[int], req: dict, max_tokens: int, stop_flag: threading.Event):
        """Yield text pieces as they are generated; set ``stop_flag`` to abandon generation."""
        from transformers import TextIteratorStreamer

        with self.lock:
            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
            ids = torch.tensor([prompt_ids], device=self.model.device)
            kw = self._kwargs(req, max_tokens, stop_flag)
            worker = threading.Thread(target=self._generate_quietly,
                                      kwargs={"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                              "streamer": streamer, **kw})
            worker.start()
            try:
                yield from streamer
            finally:
                stop_flag.set()
                worker.join()

    def _generate_quietly(self, **kw):
        with torch.no_grad():
            self.model.generate(**kw)


def _completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class Handler(BaseHTTPRequestHandler):
    server_version = "ftkit"
    protocol_version = "HTTP/1.1"

    # set on the class by make_server
    gen: Generator
    api_key: str | None = None

    def log_message(self, fmt, *args):  # route access logs through logging
        log.info("%s %s", self.address_string(), fmt % args)

    def _send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        if not self.api_key:
            return True
        given = self.headers.get("Authorization", "")
        token = given[7:] if given.startswith("Bearer ") else ""
        return hmac.compare_digest(token.encode(), self.api_key.encode())

    def _handle(self, fn) -> None:
        try:
            if self.path != "/health" and not self._authorised():
                raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                               "authentication_error", code="invalid_api_key")
            fn()
        except APIError as e:
            self._send_json(e.status, e.body())
        except (BrokenPipeError, ConnectionResetError):
            log.info("client disconnected")
        except Exception as e:  # noqa: BLE001 - a server answers rather than dies
            log.exception("request failed")
            self._send_json(500, APIError(500, f"internal error: {e}", "server_error").body())

    def do_GET(self):
        self._handle(self._get)

    def do_POST(self):
        self._handle(self._post)

    def _get(self):
        if self.path == "/health":
            self._send_json(200, {"status": "ok", "model": self.gen.name})
        elif self.path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [
                {"id": self.gen.name, "object": "model", "created": 0, "owned_by": "ftkit"}]})
        else:
            raise APIError(404, f"no route GET {self.path}", code="not_found")

    def _read_json(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise APIError(413, f"request body of {length} bytes exceeds {MAX_BODY_BYTES}")
        try:
            body = json.loads(self.rfile.read(length) or b"")
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
            self._complete(body, self.gen.tokenizer(prompt, add_special_tokens=False)["input_ids"], chat=False)
        else:
            raise APIError(404, f"no route POST {self.path}", code="not_found")

    def _complete(self, body: dict, prompt_ids: list[int], chat: bool) -> None:
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or min(256, self.gen.max_tokens_cap)
        if not isinstance(max_tokens, int):
            raise APIError(400, "max_tokens must be an integer", param="max_tokens")
        self.gen.check_budget(prompt_ids, max_tokens)
        cid, created = _completion_id("chatcmpl" if chat else "cmpl"), int(time.time())
        if body.get("stream"):
            self._stream(body, prompt_ids, max_tokens, cid, created, chat)
            return
        text, finish, n = self.gen.generate(prompt_ids, body, max_tokens)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                  if chat else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
        self._send_json(200, {
            "id": cid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": self.gen.name, "choices": [choice],
            "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": n, "total_tokens": len(prompt_ids) + n},
        })

    def _stream(self, body, prompt_ids, max_tokens, cid, created, chat) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(delta_text: str | None, finish: str | None, first: bool = False) -> None:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": delta_text} if delta_text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta_text or "", "finish_reason": finish}
            chunk = {"id": cid, "object": obj, "created": created, "model": self.gen.name, "choices": [choice]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        stop_flag = threading.Event()
        if chat:
            event(None, None, first=True)
        text = ""
        for piece in self.gen.stream(prompt_ids, body, max_tokens, stop_flag):
            if piece:
                event(piece, None)  # a disconnect raises here; stream() then stops generation
                text += piece
        n = len(self.gen.tokenizer(text, add_special_tokens=False)["input_ids"])
        event(None, "length" if n >= max_tokens else "stop")
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
                max_tokens_cap: int = 512, name: str | None = None) -> ThreadingHTTPServer:
    if not is_loopback(host) and not api_key:
        raise ValueError(f"refusing to bind to {host} without an API key: pass --api-key (or bind to 127.0.0.1)")
    gen = Generator(model_dir, name=name, max_tokens_cap=max_tokens_cap)
    handler = type("BoundHandler", (Handler,), {"gen": gen, "api_key": api_key})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def serve_forever(server: ThreadingHTTPServer) -> None:
    """Serve until SIGTERM/SIGINT, then close the socket cleanly."""
    def stop(signum, frame):
        log.info("signal %s: shutting down", signum)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = server.server_address[:2]
    print(f"ftkit serving {server.RequestHandlerClass.gen.name} on http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        print("ftkit server stopped", flush=True)
