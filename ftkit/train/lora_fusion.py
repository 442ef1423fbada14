"""One matrix product for the LoRA A projections that read the same input.

In Llama-family attention q_proj, k_proj and v_proj read the same hidden states, as do gate_proj and
up_proj in the MLP; PEFT runs one small ``x @ A.T`` per layer. Fused, the first layer of a group called
computes every A projection of the group in one product (the A matrices concatenated) and the others
take their slice: the same maths, fewer and larger kernels for a step whose host launches thousands of
them. Measured on an H200 (bench/README.md): Qwen2.5-1.5B shape +7%, Llama-3.1-8B shape +2%.

With ``base=True`` the group's frozen base projections are one product too: their weights (and
biases) are moved into one tensor that each layer's weight is a view of, so the memory is not doubled
and PEFT's own path (adapter disabled, DPO's reference) reads the same numbers. The weights must stay
where they are after fusing (a ``.to()`` to another device would copy the views apart).

Only plain LoRA layers without dropout are fused (each layer's dropout draws its own mask; DoRA and
4-bit layers have their own forward), in one process (the device plan's ``fused_lora_a``: DeepSpeed
ZeRO-3 gathers a layer's weights only when that layer's module runs). The adapter's weights, saving and
merging are unchanged.
"""

from __future__ import annotations

import torch

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fuse_lora_a(model, base: bool = False) -> int:
    """Fuse every group of ``GROUPS`` whose layers are plain LoRA layers without dropout (``base``: and
    their frozen base products); returns the number of groups fused (0: nothing in this model qualifies)."""
    from peft.tuners.lora import Linear as LoraLinear

    fused = 0
    for parent in model.modules():
        for names in GROUPS:
            layers = [getattr(parent, n, None) for n in names]
            if all(type(m) is LoraLinear and _plain(m) for m in layers):
                _FusedA(layers, base)
                fused += 1
    return fused


def _plain(layer) -> bool:
    return all(isinstance(d, torch.nn.Identity) for d in layer.lora_dropout.values()) and \
        not any(layer.use_dora.values())


class _FusedA:
    """A group's forward: the first layer computes the group's A projections, the others read theirs.
    The layers must be called in order on one tensor, as the model's code does (checked)."""

    def __init__(self, layers, base: bool = False):
        self.layers, self.x, self.z, self.y = layers, None, None, None
        self.w = self.b = None
        if base and _fusable_bases([m.base_layer for m in layers]):
            self.w, self.b = _share_storage([m.base_layer for m in layers])
        for i, m in enumerate(layers):
            m.forward = self._forward(i)

    def _forward(self, i):
        def forward(x, *args, **kwargs):
            m = self.layers[i]
            name = m.active_adapters[0] if len(m.active_adapters) == 1 else None
            if m.disable_adapters or m.merged or name is None or not isinstance(m.lora_dropout[name], torch.nn.Identity):
                return type(m).forward(m, x, *args, **kwargs)  # PEFT's own path (the group's layers alike)
            if i == 0:
                a = torch.cat([layer.lora_A[name].weight for layer in self.layers])
                z = torch.nn.functional.linear(x.to(a.dtype), a)
                self.x, self.z = x, z.split([layer.lora_A[name].weight.shape[0] for layer in self.layers], -1)
                if self.w is not None:
                    y = torch.nn.functional.linear(x, self.w, self.b)
                    self.y = y.split([layer.base_layer.out_features for layer in self.layers], -1)
            elif self.x is not x:
                raise RuntimeError(f"fused LoRA A: {type(m).__name__} layers of one group were not called in "
                                   "order on one input; set train.lora.dropout above 0 to train unfused")
            result = self.y[i] if self.w is not None else m.base_layer(x, *args, **kwargs)
            out = result + (m.lora_B[name](self.z[i]) * m.scaling[name]).to(result.dtype)
            if i == len(self.layers) - 1:
                self.x = self.z = self.y = None
            return out

        return forward


def _fusable_bases(bases) -> bool:
    """Plain frozen ``nn.Linear`` layers of one dtype and device, all with a bias or none."""
    w = [b.weight for b in bases]
    return all(type(b) is torch.nn.Linear and not b.weight.requires_grad for b in bases) and \
        len({(t.dtype, t.device, t.shape[1]) for t in w}) == 1 and len({b.bias is None for b in bases}) == 1


def _share_storage(bases):
    """One tensor holding the layers' weights (and one their biases); each layer's are views of it."""
    w = torch.cat([b.weight.detach() for b in bases])
    bias = torch.cat([b.bias.detach() for b in bases]) if bases[0].bias is not None else None
    start = 0
    for b in bases:
        n = b.out_features
        b.weight = torch.nn.Parameter(w[start:start + n], requires_grad=False)
        if bias is not None:
            b.bias = torch.nn.Parameter(bias[start:start + n], requires_grad=False)
        start += n
    return w, bias
