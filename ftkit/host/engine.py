"""The generation engine behind ``ftkit serve``: transformers' continuous batching over a fixed KV pool,
greedy and sampled requests on their own managers, prompts built as stage 02 built the training data."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from pathlib import Path

import torch

from ftkit.core import reasoning
from ftkit.core.config import ModelConfig
from ftkit.core.masking import encode_prompt
from ftkit.core.modeling import load_tokenizer, resolve_device, stop_token_ids, weights_kwargs


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}  # extra response headers (Retry-After on a 429)

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
    ``kv_cache_tokens`` tokens (None: 16,384 on a CPU, sized from free memory on a GPU): requests wait for
    room, and one that could never fit is refused up front. On a CUDA GPU the engine also takes 2,048
    tokens a step, bf16, PyTorch's variable-length flash attention on the paged cache, CUDA graphs and
    double-buffering (:mod:`ftkit.host.gpu_engine`; ``attention``, ``cuda_graphs``, ``async_batching`` and
    ``max_batch_tokens`` override them).

    Admission: each request holds the KV blocks its prompt plus ``max_tokens`` could fill (blocks of
    :data:`KV_PAGE_TOKENS`) from the moment it is queued until it ends. Requests are admitted while the
    blocks held stay within :data:`ADMIT_POOLS` pools (one pool running, one pool's worth waiting its
    turn); past that a request is refused at once with 429 and ``Retry-After`` rather than queued without
    bound (tests/test_server_load.py: 200 requests at 32 concurrency on a pool of 12 blocks).
    """

    def __init__(self, model_dir: str | Path, *, name: str | None = None, max_tokens_cap: int = 512,
                 max_prompt_tokens: int | None = None, kv_cache_tokens: int | None = None,
                 max_batch_tokens: int | None = None, device: str = "auto", threads: int | None = None,
                 attention: str = "auto", cuda_graphs: bool | None = None, async_batching: bool | None = None):
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
            self.model = AutoPeftModelForCausalLM.from_pretrained(str(model_dir), dtype="auto",
                                                                  use_safetensors=True).merge_and_unload()
        else:  # safetensors only: a folder of pickle checkpoints is refused before it is opened
            self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto",
                                                              **weights_kwargs(model_dir))
        self.model = self.model.to(dev).eval()
        self.engine_extra: dict = {}  # further ContinuousBatchingConfig fields (GPU settings)
        if dev.type == "cuda":
            from ftkit.host.gpu_engine import gpu_setup

            if self.model.dtype == torch.float32 and torch.cuda.is_bf16_supported():
                self.model = self.model.to(torch.bfloat16)
            plan = gpu_setup(self.model, kv_cache_tokens=kv_cache_tokens, max_batch_tokens=max_batch_tokens,
                             attention=attention, cuda_graphs=cuda_graphs, page_tokens=KV_PAGE_TOKENS,
                             async_batching=async_batching)
            kv_cache_tokens, max_batch_tokens, self.engine_extra = (plan["kv_cache_tokens"], plan["max_batch_tokens"],
                                                                    plan["extra"])
        kv_cache_tokens, max_batch_tokens = kv_cache_tokens or 16384, max_batch_tokens or 512
        self.settings = {"kv_cache_tokens": kv_cache_tokens, "max_batch_tokens": max_batch_tokens,
                         "attention": self.model.config._attn_implementation, **self.engine_extra}
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
        self.pool_blocks = -(-kv_cache_tokens // KV_PAGE_TOKENS)
        self._held: dict[str, int] = {}  # request id -> KV blocks it holds (admission)
        self._held_lock = threading.Lock()
        self._engine("greedy")  # started now, so the first request does not pay for it

    # -- prompts: one function for the server and the consistency check --------------------------
    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a chat prompt: :func:`ftkit.core.masking.encode_prompt`, as stage 02 rendered training data."""
        return encode_prompt(self.tokenizer, messages)

    def opens_inside(self, prompt_ids: list[int]) -> bool:
        """Whether the chat prompt opened the reply's ``<think>`` block itself (see :mod:`ftkit.core.reasoning`)."""
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
                    max_batch_tokens=self.max_batch_tokens, per_request_processors=kind == "sample",
                    extra=self.engine_extra))
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
        self._admit(rid, -(-(len(prompt_ids) + max_tokens) // KV_PAGE_TOKENS))
        q: queue.Queue = queue.Queue()
        self._queues[rid] = q
        try:
            added = manager.add_request(prompt_ids, request_id=rid, max_new_tokens=max_tokens, streaming=streaming,
                                        eos_token_id=self.stop_ids, **kw)
        except BaseException:
            self._release(rid)
            raise
        if added is None:
            self._release(rid)
            raise APIError(503, "the generation engine is not accepting requests (shutting down?)", "server_error")
        return manager, rid, q

    def _admit(self, rid: str, blocks: int) -> None:
        """Hold ``blocks`` KV blocks for request ``rid``, or refuse it with 429 when the pool and its waiting
        room are taken."""
        limit = ADMIT_POOLS * self.pool_blocks
        with self._held_lock:
            held = sum(self._held.values())
            if held + blocks > limit:
                raise APIError(429, f"the server is busy: requests in flight hold {held} of its {limit} KV blocks "
                                    f"(the pool of {self.pool_blocks} blocks and as many waiting) and this one needs "
                                    f"{blocks}; retry after {RETRY_AFTER_S} s", "rate_limit_error",
                               code="kv_pool_full", headers={"Retry-After": str(RETRY_AFTER_S)})
            self._held[rid] = blocks

    def _release(self, rid: str) -> bool:
        """Give back ``rid``'s blocks and its result queue; True if it still held them (it had not ended)."""
        with self._held_lock:
            held = self._held.pop(rid, None) is not None
        self._queues.pop(rid, None)
        return held

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
            self._release(rid)
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
        return _Pieces(self._pieces(manager, rid, q, done), lambda: self._release(rid) and manager.cancel_request(rid))

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

    def engine_config(self, kind: str = "greedy"):
        """The resolved ``ContinuousBatchingConfig`` of an engine that has started (benchmarks, logs)."""
        return self._engines[kind].continuous_batching_config

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


class _Pieces:
    """A stream's text pieces; ``close()`` ends the request even when no piece was ever asked for (a client
    gone before the first event: closing a generator that never started runs none of its ``finally``)."""

    def __init__(self, pieces, end):
        self._pieces, self._end = pieces, end

    def __iter__(self):
        return self._pieces

    def close(self) -> None:
        self._pieces.close()
        self._end()


KV_PAGE_TOKENS = 256
ADMIT_POOLS = 2
"""Requests are admitted while the KV blocks they may fill stay within this many pools: one running,
one waiting its turn; beyond that a request gets 429 at once."""
RETRY_AFTER_S = 1


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
                         page_tokens: int = KV_PAGE_TOKENS, extra: dict | None = None) -> dict:
    """Keyword arguments for transformers' ``ContinuousBatchingConfig`` (``cls``) under the names this
    version takes: the tokens per KV block are ``page_size`` from 5.24 (``block_size`` there is a
    deprecated alias) and ``block_size`` before (5.17: ``page_size`` is a TypeError).

    The KV pool's size (block size and ``num_blocks``) and ``max_batch_tokens`` bound the server's
    memory, and ``per_request_processors`` is what applies each request's temperature and top-p: a
    version without one of those raises :class:`EngineConfigError` rather than serving something
    else. ``per_request_processors=False`` is the engine's default, so it is only passed when True.
    ``extra`` (the GPU settings: CUDA graphs, KV padding) are optimisations, passed where the version has them.
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
    kw.update({k: v for k, v in (extra or {}).items() if k in fields})
    return kw
