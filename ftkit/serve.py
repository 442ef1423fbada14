"""An OpenAI-compatible HTTP server for a merged model (or a base model + LoRA adapter).

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions`` (streaming over
server-sent events with ``"stream": true``) and ``POST /v1/completions``. Chat prompts are built by
:func:`ftkit.masking.encode_prompt`, the function that rendered the training data, and generation
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
Content-Length; a connection silent for :data:`READ_TIMEOUT_S` is answered or closed; a client that disconnects
mid-stream has its request cancelled in the engine; SIGTERM stops the engine and closes the socket.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import queue
import signal
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from . import reasoning
from .config import ModelConfig
from .masking import encode_prompt
from .modeling import load_tokenizer, resolve_device, stop_token_ids

log = logging.getLogger("ftkit")
MAX_BODY_BYTES = 1 << 20
READ_TIMEOUT_S = 10.0
"""Seconds a connection may stay silent while the server reads from it (a request line, headers, a
body shorter than its Content-Length, an idle keep-alive connection): then it is answered or closed,
so a client that stops sending never holds a server thread for good. ``ftkit serve --read-timeout``."""


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Generator:
    """The model behind the server: prompts rendered as in training, replies from transformers'
    continuous batching.

    Generation runs in transformers' :class:`ContinuousBatchingManager` (``model.init_continuous_batching``):
    one background thread steps every in-flight request together, so concurrent requests share each
    forward pass instead of queueing behind a lock (on 2 CPU cores, 16 concurrent greedy requests of
    SmolLM2-135M ran ~4x the tokens/s of one at a time; README, "Serving, exports and cost"). Greedy requests
    (``temperature`` 0, the default) go to one manager; sampled requests go to a second one, created
    on first use, with per-request temperature and top-p. The KV cache is a fixed pool of
    ``kv_cache_tokens`` tokens: requests wait for room, and one that could never fit is refused up front.
    """

    def __init__(self, model_dir: str | Path, *, name: str | None = None, max_tokens_cap: int = 512,
                 max_prompt_tokens: int | None = None, kv_cache_tokens: int = 16384, max_batch_tokens: int = 512,
                 device: str = "auto", threads: int | None = None):
        from transformers import AutoModelForCausalLM

        dev = resolve_device(ModelConfig(device=device))
        if dev.type == "cpu":
            # one core less than torch would take: the HTTP threads (and, in the notebook, the load
            # generator) need one, and threads that wait for a busy core spin (measured 10x slower)
            torch.set_num_threads(threads or max(1, torch.get_num_threads() - 1))

        model_dir = Path(model_dir)
        self.name = name or model_dir.name
        self.max_tokens_cap = max_tokens_cap
        self.tokenizer = load_tokenizer(str(model_dir))
        if (model_dir / "adapter_config.json").exists():
            from peft import AutoPeftModelForCausalLM

            # continuous batching needs a plain model: fold the adapter in at load (in memory only)
            self.model = AutoPeftModelForCausalLM.from_pretrained(str(model_dir), dtype="auto").merge_and_unload()
        else:
            self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto")
        self.model = self.model.to(dev).eval()
        self.stop_ids = stop_token_ids(self.tokenizer)
        self.reasoning = reasoning.markers_for(self.tokenizer)
        self.context_len = getattr(self.model.config, "max_position_embeddings", 2048)
        self.kv_cache_tokens = kv_cache_tokens
        self.max_batch_tokens = max_batch_tokens
        # the longest sequence (prompt + reply) one request may need
        self.max_sequence_tokens = min(self.context_len, kv_cache_tokens)
        self.max_prompt_tokens = min(max_prompt_tokens or self.max_sequence_tokens, self.max_sequence_tokens)
        self._engines: dict[str, object] = {}
        self._queues: dict[str, queue.Queue] = {}
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._dispatchers: list[threading.Thread] = []
        self._engine("greedy")  # started now, so the first request does not pay for it

    # -- prompts: one function for the server and the consistency check --------------------------
    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a chat prompt: :func:`ftkit.masking.encode_prompt`, as stage 02 rendered training data."""
        return encode_prompt(self.tokenizer, messages)

    def opens_inside(self, prompt_ids: list[int]) -> bool:
        """Whether the chat prompt opened the reply's ``<think>`` block itself (see :mod:`ftkit.reasoning`)."""
        return bool(self.reasoning) and reasoning.starts_inside(self.tokenizer.decode(prompt_ids[-8:]), self.reasoning)

    def encode_text(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def check_budget(self, prompt_ids: list[int], max_tokens: int) -> None:
        if max_tokens < 1 or max_tokens > self.max_tokens_cap:
            raise APIError(400, f"max_tokens must be between 1 and {self.max_tokens_cap}, got {max_tokens} "
                                "(the server's --max-tokens-cap)", param="max_tokens")
        if len(prompt_ids) > self.max_prompt_tokens:
            raise APIError(400, f"prompt has {len(prompt_ids)} tokens, more than the {self.max_prompt_tokens} this "
                                "server accepts (the model's context or --max-prompt-tokens); shorten the messages",
                           param="messages", code="context_length_exceeded")
        if len(prompt_ids) + max_tokens > self.max_sequence_tokens:
            raise APIError(400, f"prompt has {len(prompt_ids)} tokens; with max_tokens={max_tokens} that exceeds "
                                f"the model's context of {self.max_sequence_tokens} tokens", param="messages",
                           code="context_length_exceeded")

    # -- generation ------------------------------------------------------------------------------
    def _engine(self, kind: str):
        from transformers import ContinuousBatchingConfig, GenerationConfig

        with self._lock:
            if kind in self._engines:
                return self._engines[kind]
            if self._closing.is_set():
                raise APIError(503, "the server is shutting down", "server_error")
            gc = GenerationConfig(max_new_tokens=self.max_tokens_cap, eos_token_id=self.stop_ids,
                                  pad_token_id=self.tokenizer.pad_token_id, do_sample=kind == "sample")
            if kind == "sample":  # values other than 1.0 make transformers build the per-request processors
                gc.temperature, gc.top_p, gc.top_k = 0.7, 0.95, 0
            try:
                cb = ContinuousBatchingConfig(**engine_config_kwargs(
                    ContinuousBatchingConfig, kv_cache_tokens=self.kv_cache_tokens,
                    max_batch_tokens=self.max_batch_tokens, per_request_processors=kind == "sample"))
            except EngineConfigError as e:
                if kind == "sample":  # the greedy engine still serves temperature 0
                    raise APIError(400, f"sampling is not available on this server: {e}; send temperature 0",
                                   param="temperature") from None
                raise
            manager = self.model.init_continuous_batching(generation_config=gc, continuous_batching_config=cb)
            with torch.inference_mode():  # the engine's thread inherits the caller's mode: no autograd graphs
                manager.start()
            self._engines[kind] = manager
            t = threading.Thread(target=self._dispatch, args=(manager,), name=f"ftkit-{kind}-results", daemon=True)
            t.start()
            self._dispatchers.append(t)
            return manager

    def _dispatch(self, manager) -> None:
        """Route each result of the engine to the queue of the request that waits for it."""
        while not self._closing.is_set():
            result = manager.get_result(timeout=0.2)
            if result is None:
                if not manager.is_running():
                    time.sleep(0.2)
                continue
            q = self._queues.get(result.request_id)
            if q is not None:
                q.put(result)

    def _submit(self, prompt_ids: list[int], req: dict, max_tokens: int, streaming: bool):
        try:
            temperature = float(req.get("temperature") or 0.0)
            top_p = float(req.get("top_p") if req.get("top_p") is not None else 1.0)
        except (TypeError, ValueError):
            raise APIError(400, f"temperature and top_p must be numbers, got {req.get('temperature')!r} and "
                                f"{req.get('top_p')!r}", param="temperature") from None
        if temperature < 0 or not 0 < top_p <= 1:
            raise APIError(400, f"temperature must be >= 0 and top_p in (0, 1], got {temperature} and {top_p}",
                           param="temperature")
        kw = {"temperature": temperature, "top_p": top_p} if temperature > 0 else {}
        manager = self._engine("sample" if temperature > 0 else "greedy")
        rid = f"req-{uuid.uuid4().hex}"
        q: queue.Queue = queue.Queue()
        self._queues[rid] = q
        if manager.add_request(prompt_ids, request_id=rid, max_new_tokens=max_tokens, streaming=streaming,
                               eos_token_id=self.stop_ids, **kw) is None:
            self._queues.pop(rid, None)
            raise APIError(503, "the generation engine is not accepting requests (shutting down?)", "server_error")
        return manager, rid, q

    def _results(self, manager, rid: str, q: queue.Queue):
        """Results of one request until it finishes; cancels it if the caller stops early."""
        finished = False
        try:
            while True:
                try:
                    result = q.get(timeout=1.0)
                except queue.Empty:
                    if self._closing.is_set() or not manager.is_running():
                        raise APIError(503, "the generation engine stopped before this request finished",
                                       "server_error") from None
                    continue
                if result.error:
                    finished = True
                    raise APIError(500, f"generation failed: {result.error}", "server_error")
                finished = result.is_finished()
                yield result
                if finished:
                    return
        finally:
            self._queues.pop(rid, None)
            if not finished:
                manager.cancel_request(rid)

    def _split(self, tokens: list[int]) -> tuple[list[int], str]:
        """(reply tokens without the end-of-turn token, finish_reason)."""
        for k, t in enumerate(tokens):
            if t in self.stop_ids:
                return tokens[:k], "stop"
        return tokens, "length"

    def generate(self, prompt_ids: list[int], req: dict, max_tokens: int) -> tuple[str, str, list[int]]:
        """(text, finish_reason, generated token ids including the end-of-turn token when there is one)."""
        manager, rid, q = self._submit(prompt_ids, req, max_tokens, streaming=False)
        result = list(self._results(manager, rid, q))[-1]
        tokens = list(result.generated_tokens)
        reply, finish = self._split(tokens)
        return self.tokenizer.decode(reply, skip_special_tokens=True), finish, tokens[:len(reply) + (finish == "stop")]

    def stream(self, prompt_ids: list[int], req: dict, max_tokens: int, done: dict):
        """Yield text pieces as tokens arrive; ``done`` receives finish_reason and token ids at the end.

        The request is queued before this returns (so errors surface before any response is sent);
        closing the generator early (a client that went away) cancels it in the engine.
        """
        manager, rid, q = self._submit(prompt_ids, req, max_tokens, streaming=True)
        return self._pieces(manager, rid, q, done)

    def _pieces(self, manager, rid: str, q: queue.Queue, done: dict):
        sent = ""
        tokens: list[int] = []
        for result in self._results(manager, rid, q):
            tokens = list(result.generated_tokens)
            reply, finish = self._split(tokens)
            text = self.tokenizer.decode(reply, skip_special_tokens=True)
            if text.endswith("\ufffd") and not result.is_finished():
                continue  # half of a multi-byte character: wait for the rest
            if len(text) > len(sent) and text.startswith(sent):
                yield text[len(sent):]
                sent = text
            if finish == "stop":
                break
        reply, finish = self._split(tokens)
        done.update(finish_reason=finish, token_ids=tokens[:len(reply) + (finish == "stop")])

    @property
    def in_flight(self) -> int:
        return len(self._queues)

    def close(self) -> None:
        """Stop the engines (pending requests are failed) and their result threads."""
        self._closing.set()
        with self._lock:
            for manager in self._engines.values():
                manager.stop(block=True, timeout=10, hard_stop=True)
            self._engines.clear()
        for t in self._dispatchers:
            t.join(timeout=2)


KV_PAGE_TOKENS = 256
"""Tokens per KV-cache block (the engine's own default); the pool is ``kv_cache_tokens`` rounded up to blocks."""


class EngineConfigError(RuntimeError):
    """The installed transformers' ContinuousBatchingConfig lacks a setting the server cannot do without."""


def _config_fields(cls) -> set[str]:
    """The keyword arguments ``cls`` takes: its dataclass fields, else its ``__init__``'s parameters."""
    import dataclasses
    import inspect

    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls) if f.init}
    return {n for n, p in inspect.signature(cls.__init__).parameters.items()
            if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def engine_config_kwargs(cls, *, kv_cache_tokens: int, max_batch_tokens: int, per_request_processors: bool,
                         page_tokens: int = KV_PAGE_TOKENS) -> dict:
    """Keyword arguments for transformers' ``ContinuousBatchingConfig`` (``cls``) under the names this
    version takes: the tokens per KV block are ``page_size`` from 5.24 (``block_size`` there is a
    deprecated alias) and ``block_size`` before (5.17: ``page_size`` is a TypeError).

    The KV pool's size (block size and ``num_blocks``) and ``max_batch_tokens`` bound the server's
    memory, and ``per_request_processors`` is what applies each request's temperature and top-p: a
    version without one of those raises :class:`EngineConfigError` rather than serving something
    else. ``per_request_processors=False`` is the engine's default, so it is only passed when True.
    """
    fields = _config_fields(cls)
    size = next((n for n in ("page_size", "block_size") if n in fields), None)
    missing = [n for n in ("num_blocks", "max_batch_tokens") if n not in fields]
    if size is None:
        missing.insert(0, "page_size/block_size")
    if per_request_processors and "per_request_processors" not in fields:
        missing.append("per_request_processors")
    if missing:
        raise EngineConfigError(f"this transformers' ContinuousBatchingConfig has no {', '.join(missing)}")
    kw = {size: page_tokens, "num_blocks": -(-kv_cache_tokens // page_tokens), "max_batch_tokens": max_batch_tokens}
    if per_request_processors:
        kw["per_request_processors"] = True
    # an optimisation switch, so dropped where missing: 0 keeps the engine off its decode fast path
    # (flash_attn_with_kvcache, only with flash attention on CUDA), as ftkit always ran it; a version
    # without the setting has no such path to turn off
    if "max_blocks_per_request" in fields:
        kw["max_blocks_per_request"] = 0
    return kw


def _completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class Handler(BaseHTTPRequestHandler):
    server_version = "ftkit"
    protocol_version = "HTTP/1.1"

    # set on the class by make_server
    gen: Generator
    api_key: str | None = None
    timeout = READ_TIMEOUT_S  # socketserver applies it to the connection's socket (reads and writes)

    def log_message(self, fmt, *args):  # route access logs through logging
        log.info("%s %s", self.address_string(), fmt % args)

    def _send_json(self, status: int, body: dict, close: bool = False) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
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
            self._send_json(e.status, e.body(), close=not self._body_read)
        except (BrokenPipeError, ConnectionResetError):
            log.info("client disconnected")
        except TimeoutError:  # a write to a client that stopped reading
            log.info("client stopped reading for %.0f s: connection closed", self.timeout)
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - a server answers rather than dies
            log.exception("request failed")
            self._send_json(500, APIError(500, f"internal error: {e}", "server_error").body(), close=not self._body_read)

    def do_GET(self):
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
            raise APIError(400, f"request body ended before its Content-Length of {length} bytes (nothing more "
                                f"arrived for {self.timeout:.0f} s)", code="incomplete_body") from None
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
                kv_cache_tokens: int = 16384, threads: int | None = None,
                read_timeout: float = READ_TIMEOUT_S) -> ThreadingHTTPServer:
    if not is_loopback(host) and not api_key:
        raise ValueError(f"refusing to bind to {host} without an API key: pass --api-key (or bind to 127.0.0.1)")
    gen = Generator(model_dir, name=name, max_tokens_cap=max_tokens_cap, max_prompt_tokens=max_prompt_tokens,
                    kv_cache_tokens=kv_cache_tokens, threads=threads)
    handler = type("BoundHandler", (Handler,), {"gen": gen, "api_key": api_key, "timeout": read_timeout})
    try:
        server = _Server((host, port), handler)
    except OSError:
        gen.close()
        raise
    return server


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the listen backlog: a burst of clients connecting at once is queued, not refused


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
