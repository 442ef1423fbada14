"""One matrix product for the LoRA A projections that read the same input.

In Llama-family attention q_proj, k_proj and v_proj read the same hidden states, as do gate_proj and
up_proj in the MLP; PEFT runs one small ``x @ A.T`` per layer. Fused, the first layer of a group called
computes every A projection of the group in one product (the A matrices concatenated) and the others
take their slice: the same maths, fewer and larger kernels for a step whose host launches thousands of
them. Measured on an H200 (bench/README.md): Qwen2.5-1.5B shape +7%, Llama-3.1-8B shape +2%.

Only plain LoRA layers without dropout are fused (each layer's dropout draws its own mask; DoRA and
4-bit layers have their own forward), in one process (the device plan's ``fused_lora_a``: DeepSpeed
ZeRO-3 gathers a layer's weights only when that layer's module runs). The adapter's weights, saving and
merging are unchanged.
"""

from __future__ import annotations

import torch

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fuse_lora_a(model) -> int:
    """Fuse every group of ``GROUPS`` whose layers are plain LoRA layers without dropout; returns the
    number of groups fused (0: nothing in this model qualifies)."""
    from peft.tuners.lora import Linear as LoraLinear

    fused = 0
    for parent in model.modules():
        for names in GROUPS:
            layers = [getattr(parent, n, None) for n in names]
            if all(type(m) is LoraLinear and _plain(m) for m in layers):
                _FusedA(layers)
                fused += 1
    return fused


def _plain(layer) -> bool:
    return all(isinstance(d, torch.nn.Identity) for d in layer.lora_dropout.values()) and \
        not any(layer.use_dora.values())


class _FusedA:
    """A group's forward: the first layer computes the group's A projections, the others read theirs.
    The layers must be called in order on one tensor, as the model's code does (checked)."""

    def __init__(self, layers):
        self.layers, self.x, self.z = layers, None, None
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
            elif self.x is not x:
                raise RuntimeError(f"fused LoRA A: {type(m).__name__} layers of one group were not called in "
                                   "order on one input; set train.lora.dropout above 0 to train unfused")
            result = m.base_layer(x, *args, **kwargs)
            out = result + (m.lora_B[name](self.z[i]) * m.scaling[name]).to(result.dtype)
            if i == len(self.layers) - 1:
                self.x = self.z = None
            return out

        return forward
