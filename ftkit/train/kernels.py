"""Faster kernels for the training step: variable-length attention over packed examples, Liger's fused
kernels, and torch.compile of the decoder layers and the loss."""

from __future__ import annotations

import sys

import torch

VARLEN = "ftkit_varlen"


def varlen_fn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_attention(fn):
    """ftkit's attention over packed examples, with PyTorch's variable-length flash kernel ``fn``
    (its options resolved here once, not on every call).

    Each example attends only to itself, and the kernel computes only the examples' own causal
    triangles (sum of L^2/2), not the packed row's (sum of L)^2/2 as SDPA with a block mask does.
    Boundaries come from the collator (``cu_seq_lens_q``, ``max_length_q``: no device sync), else
    from ``position_ids`` (restarting at 0 per example). Without the kernel (CPU, fp32) each example
    goes through SDPA on its own. transformers builds no mask for this implementation: a batch of
    several right-padded rows gets plain causal SDPA, exact for every real token.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ftkit.core.varlen import kernel_options, run_kernel

    options = kernel_options(fn)

    def forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                is_causal: bool | None = None, **kwargs):
        if query.shape[0] != 1 or attention_mask is not None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                          is_causal=attention_mask is None, **kwargs)
        n = query.shape[2]
        cu, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
        if cu is None:
            position_ids = kwargs.get("position_ids")
            starts = torch.zeros(1, dtype=torch.int32, device=query.device)
            if position_ids is not None:
                found = (position_ids.reshape(-1) == 0).nonzero().reshape(-1).to(torch.int32)
                starts = torch.unique(torch.cat([starts, found]))
            cu = torch.cat([starts, torch.tensor([n], dtype=torch.int32, device=query.device)])
            longest = int(cu.diff().max())
        if isinstance(longest, torch.Tensor):  # an int from transformers' collator; kept symbolic when traced
            longest = int(longest)
        cu = cu.to(device=query.device, dtype=torch.int32)
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, head_dim)
        if query.device.type != "cuda" or query.dtype not in (torch.bfloat16, torch.float16) or dropout:
            outs = []
            for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
                qs, ks, vs = (t[a:b].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
                outs.append(sdpa_attention_forward(module, qs, ks, vs, None, dropout=dropout, scaling=scaling,
                                                   is_causal=True)[0][0])
            return torch.cat(outs).unsqueeze(0), None
        return run_kernel(fn, options, q, k, v, cu, cu, longest, longest, scaling).unsqueeze(0), None

    return forward


def register_varlen_attention(traced: bool = False) -> bool:
    """Register :func:`varlen_attention` with transformers as ``ftkit_varlen``; False when this
    PyTorch has no ``torch.nn.attention.varlen`` (then SDPA with a block mask is used). Compiled
    layers call it eagerly unless ``traced`` (an experiment: the kernel is a torch custom op, so a
    layer can be one graph; ``bench/train_throughput.py`` measures it)."""
    fn = varlen_fn()
    if fn is None:
        return False
    from transformers import AttentionInterface

    forward = varlen_attention(fn)
    AttentionInterface.register(VARLEN, forward if traced else torch.compiler.disable(forward))
    return True


def liger_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def apply_fused_kernels(model, fused_loss: bool = False) -> bool:
    """Liger's fused RMSNorm and SwiGLU (and, with ``fused_loss``, its linear + cross-entropy that never
    builds the logits) on this model instance; rotary embeddings stay (Liger patches those
    module-wide). False when unsupported."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return False
    if getattr(model.config, "model_type", None) not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return False
    # Liger also swaps the classes in the model's modeling module (e.g. modeling_llama.LlamaRMSNorm),
    # so every model built later in the process would get its modules too: put the module back.
    module = sys.modules[type(model).__module__]
    before = dict(vars(module))
    try:
        _apply_liger_kernel_to_instance(model=model, rope=False, fused_linear_cross_entropy=fused_loss)
    finally:
        for name in [n for n in vars(module) if n not in before]:
            delattr(module, name)
        for name, value in before.items():
            if getattr(module, name, None) is not value:
                setattr(module, name, value)
    return True


def compile_layers(model, **options) -> int:
    """torch.compile every decoder layer in place (one graph shared by the layers; dynamic shapes,
    as packed lengths change every step); the attention kernel call itself stays eager.
    ``options``: more ``torch.compile`` options (the bench's experiments)."""
    layers = next((m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)
                   and type(m[0]).__name__.endswith("DecoderLayer")), None)
    if layers is None:
        return 0
    for layer in layers:
        layer.compile(dynamic=True, **options)
    return len(layers)


def compile_loss(model) -> bool:
    """torch.compile the model's loss (transformers' ``loss_function``: the logits upcast to fp32,
    log-softmax, the targets picked). Compiled, the upcast and the softmax fuse into reductions over
    the bf16 logits: no fp32 copy of a tokens x vocabulary matrix is written, forward or backward
    (on a 152k vocabulary, 8 GB a step at 13k tokens). The maths is the same: the reductions run in fp32."""
    if not isinstance(getattr(type(model), "loss_function", None), property):
        return False
    model.loss_function = torch.compile(model.loss_function, dynamic=True)
    return True
