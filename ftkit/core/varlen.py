"""PyTorch's variable-length flash attention (``torch.nn.attention.varlen.varlen_attn``) as training's
packed attention (:mod:`ftkit.train.kernels`) and serving's paged attention (:mod:`ftkit.host.gpu_engine`)
both call it: the options this torch version takes, resolved once, and grouped-query attention."""

from __future__ import annotations

import inspect


def accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def kernel_options(kernel) -> dict:
    """How to ask ``kernel`` for causal attention and whether it takes grouped-query heads itself."""
    return {"causal": {"is_causal": True} if accepts(kernel, "is_causal") else {"window_size": (-1, 0)},
            "gqa": accepts(kernel, "enable_gqa")}


def run_kernel(kernel, options: dict, q, k, v, cu_q, cu_k, max_q: int, max_k: int, scaling):
    """``kernel`` over packed ``q`` (tokens, heads, dim) and ``k``/``v`` (tokens, kv heads, dim); key and
    value heads are repeated for the query heads where the kernel does not group them itself."""
    kw = {"scale": scaling, **options["causal"]}
    if q.shape[1] != k.shape[1]:  # grouped-query attention
        if options["gqa"]:
            kw["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    return kernel(q, k, v, cu_q, cu_k, max_q, max_k, **kw)
