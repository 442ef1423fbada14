"""How :class:`ftkit.host.engine.Generator` sets transformers' continuous batching up on a GPU.

On a CPU the engine keeps its small fixed settings (a 16,384-token KV pool, 512 tokens a step, transformers'
``paged|sdpa``). On a CUDA GPU (``bench/serve_throughput.py`` on an H200, Llama-3.1-8B shape, bench/README.md
"GPU serving"; single stream 15 -> 89 tokens/s, 64 streams 353 -> 2,038):

- **the KV pool sized from free memory** (:func:`auto_kv_cache_tokens`) instead of 16,384 tokens, which held
  only 32 requests of a 200-token prompt and up to 256 new tokens (two 256-token blocks each) while the rest
  waited (64 streams: 353 -> 537 tokens/s with the next item);
- **512 -> 2,048 tokens a step** (``max_batch_tokens``): many new requests' prompts prefill in fewer steps;
- **bf16** where the checkpoint is fp32;
- **variable-length flash attention on the paged cache** (:func:`paged_varlen_attention`, registered as
  ``paged|ftkit_varlen``): PyTorch's own flash kernel (``torch.nn.attention.varlen``, no flash-attn package),
  each sequence attending only to its own keys. transformers' ``paged|sdpa`` runs one SDPA call over the
  batch's packed keys with a dense mask, so at 64 streams every query reads all 64 sequences' keys (repeated
  to every query head), and the mask keeps transformers from capturing CUDA graphs by itself;
- **CUDA graphs**: each padded batch shape is captured once and replayed (the KV read padded to
  :data:`KV_PADDING_TOKENS` rather than transformers' 16,384, so a short context does not read 16,384 rows);
- **double-buffering** (``use_async_batching``): the host prepares the next batch while the GPU runs this one
  (64 streams 1,068 -> 2,038 tokens/s); transformers enables it only for attentions named flash.

What is left is host time: a step at 64 streams takes ~29 ms where its bytes need ~4 ms at the card's
bandwidth (13% of the bound), spent in transformers' Python scheduling and batch preparation and in the
HTTP threads that share the interpreter; ``ftkit serve --engine vllm`` is the path for many streams.
"""

from __future__ import annotations

import torch

from ftkit.core.generation import kv_bytes_per_token
from ftkit.core.varlen import kernel_options, run_kernel

PAGED_VARLEN = "paged|ftkit_varlen"
KV_POOL_FRACTION = 0.3
"""Share of the GPU memory free after loading that one engine's KV pool takes: the greedy engine and, once
a sampled request comes, the sampling engine take one each, leaving the rest for activations, logits and
CUDA graphs."""
KV_POOL_MAX_TOKENS = 262_144
"""Upper bound of an automatic pool (1,024 blocks of 256 tokens): 34 GB for a Llama-3.1-8B shape."""
GPU_MAX_BATCH_TOKENS = 2048
KV_PADDING_TOKENS = 2048


def auto_kv_cache_tokens(config, dtype: torch.dtype, free_bytes: int, page_tokens: int) -> int:
    """The KV pool for the memory free on the device: :data:`KV_POOL_FRACTION` of it, in whole blocks of
    ``page_tokens``, at least one block and at most :data:`KV_POOL_MAX_TOKENS`."""
    tokens = int(free_bytes * KV_POOL_FRACTION) // kv_bytes_per_token(config, dtype)
    tokens = min(tokens, KV_POOL_MAX_TOKENS) // page_tokens * page_tokens
    return max(page_tokens, tokens)


def paged_varlen_attention(kernel):
    """An attention function for transformers' continuous batching (``paged|...``): writes the step's keys
    and values into the paged cache, reads each sequence's keys back (``cache.update``, as transformers'
    own paged implementations do) and runs ``kernel`` (``torch.nn.attention.varlen.varlen_attn``) over the
    packed queries and keys with the batch's cumulative lengths: each sequence attends causally to its own
    keys only, the queries aligned to the end of its keys (a sequence's new tokens come after its cached ones).
    Without ``kernel`` (CPU, fp32) each sequence goes through SDPA on its own, with the same alignment."""
    options = kernel_options(kernel) if kernel is not None else None

    def forward(module, query, key, value, attention_mask, cache=None, cu_seq_lens_q=None, cu_seq_lens_k=None,
                max_seqlen_q=None, max_seqlen_k=None, scaling=None, dropout=0.0, **kwargs):
        if cache is None:
            raise ValueError(f"{PAGED_VARLEN} runs only inside continuous batching (it needs the paged cache)")
        if isinstance(cu_seq_lens_k, dict):  # the lengths by layer type (models with sliding-window layers)
            cu_seq_lens_k, max_seqlen_k = cu_seq_lens_k["full_attention"], max_seqlen_k["full_attention"]
        k, v = cache.update(key_states=key, value_states=value, layer_idx=module.layer_idx,
                            read_index=kwargs["read_index"], write_index=kwargs["write_index"])  # (tokens, kv heads, dim)
        q = query.transpose(1, 2).squeeze(0).contiguous()  # (tokens, heads, dim)
        k, v = k.contiguous(), v.contiguous()
        if kernel is None or q.device.type != "cuda" or q.dtype not in (torch.bfloat16, torch.float16):
            return per_sequence_attention(q, k, v, cu_seq_lens_q, cu_seq_lens_k, scaling), None
        return run_kernel(kernel, options, q, k, v, cu_seq_lens_q.to(torch.int32), cu_seq_lens_k.to(torch.int32),
                          int(max_seqlen_q), int(max_seqlen_k), scaling), None

    return forward


def per_sequence_attention(q, k, v, cu_q, cu_k, scaling):
    """SDPA per sequence of a packed batch (``q``: (tokens, heads, dim); ``k``, ``v``: (keys, kv heads, dim);
    cumulative lengths ``cu_q``, ``cu_k``), each sequence's queries aligned to the end of its keys: the
    reference for :func:`paged_varlen_attention` and its path without the flash kernel."""
    out = torch.zeros_like(q)
    qs, ks = cu_q.tolist(), cu_k.tolist()
    for i in range(len(qs) - 1):
        a, b, c, d = qs[i], qs[i + 1], ks[i], ks[i + 1]
        if b <= a:
            continue
        lq, lk = b - a, d - c
        allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        qi, ki, vi = (t.transpose(0, 1).unsqueeze(0) for t in (q[a:b], k[c:d], v[c:d]))
        if ki.shape[1] != qi.shape[1]:
            ki, vi = (t.repeat_interleave(qi.shape[1] // t.shape[1], dim=1) for t in (ki, vi))
        o = torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, attn_mask=allowed, scale=scaling)
        out[a:b] = o[0].transpose(0, 1)
    return out


def varlen_kernel():
    """PyTorch's variable-length flash attention (``torch.nn.attention.varlen.varlen_attn``), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def register_paged_varlen() -> bool:
    """Register :func:`paged_varlen_attention` with transformers as :data:`PAGED_VARLEN`; False when this
    PyTorch has no ``torch.nn.attention.varlen`` or this transformers no attention registry."""
    kernel = varlen_kernel()
    if kernel is None:
        return False
    try:
        from transformers import AttentionInterface
    except ImportError:
        return False
    AttentionInterface.register(PAGED_VARLEN, paged_varlen_attention(kernel))
    return True


def has_sliding_layers(config) -> bool:
    """Whether transformers' paged cache gives this model sliding-window layers (which read a window of
    keys laid out differently): :data:`PAGED_VARLEN` serves full attention only."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = getattr(config, "layer_types", None)
    if types is None:
        return getattr(config, "sliding_window", None) is not None
    return "sliding_attention" in types


def gpu_setup(model, *, kv_cache_tokens: int | None, max_batch_tokens: int | None, attention: str,
              cuda_graphs: bool | None, page_tokens: int, async_batching: bool | None = None) -> dict:
    """Settle the engine's settings on a CUDA device (see the module docstring) and set ``model``'s attention;
    returns ``kv_cache_tokens``, ``max_batch_tokens``, ``attention`` (the implementation set) and ``extra``
    (further ``ContinuousBatchingConfig`` fields, passed where the installed transformers has them).

    ``attention``: ``auto`` (:data:`PAGED_VARLEN` where it applies: bf16/fp16, full attention, PyTorch's
    varlen kernel; else ``paged|sdpa``), ``varlen`` or ``sdpa``. ``cuda_graphs`` None: on with the varlen
    attention, off with SDPA (transformers' own choice; its graphs need padded, masked SDPA over the pool)."""
    if kv_cache_tokens is None:
        torch.cuda.synchronize()
        free, _ = torch.cuda.mem_get_info(model.device)
        kv_cache_tokens = auto_kv_cache_tokens(model.config, model.dtype, free, page_tokens)
    fits = model.dtype in (torch.bfloat16, torch.float16) and not has_sliding_layers(model.config)
    impl, why = "sdpa", "bf16/fp16 weights and full-attention layers only"
    if attention in ("auto", "varlen") and fits:
        why = "this PyTorch has no torch.nn.attention.varlen (2.9 or later)"
        if register_paged_varlen():
            try:  # transformers 5.17's continuous batching takes a registered paged| attention; 5.24's does not
                model.set_attn_implementation(PAGED_VARLEN)
                if model.config._attn_implementation == PAGED_VARLEN:
                    impl = PAGED_VARLEN
                else:  # 5.24 drops the paged| prefix: what is left (training's packed attention, when a
                    # training in this process registered it) is no paged attention
                    why = (f"this transformers renames it {model.config._attn_implementation!r}: its continuous "
                           "batching takes no registered paged| attention")
            except (ValueError, KeyError) as e:
                why = f"this transformers' continuous batching does not take it ({str(e)[:80]})"
    if attention == "varlen" and impl != PAGED_VARLEN:
        raise ValueError(f"attention 'varlen' is not available: {why}")
    if impl == "sdpa" and model.config._attn_implementation in (PAGED_VARLEN, PAGED_VARLEN.split("|", 1)[1]):
        model.set_attn_implementation("sdpa")  # transformers' engine makes it its paged SDPA
    graphs = cuda_graphs if cuda_graphs is not None else impl == PAGED_VARLEN
    extra: dict = {"use_cuda_graph": graphs}
    if graphs:  # a non-zero padding interval alone would also switch graphs on
        extra["kv_padding_interval_size"] = KV_PADDING_TOKENS
    # double-buffering: the host prepares the next batch while the GPU runs this one. transformers turns it on
    # for graphs without a mask, but judges "no mask" by a flash name; paged|sdpa's mask would be copied each step
    extra["use_async_batching"] = async_batching if async_batching is not None else graphs and impl == PAGED_VARLEN
    return {"kv_cache_tokens": kv_cache_tokens, "max_batch_tokens": max_batch_tokens or GPU_MAX_BATCH_TOKENS,
            "attention": impl, "extra": extra}
