"""The packing probe: a packed batch must give each example the logits it gets alone (no attention
leaks across example boundaries), checked on the model being trained before training starts."""

from __future__ import annotations

import torch


class PackingError(RuntimeError):
    """The model's attention would mix packed examples."""


@torch.no_grad()
def packing_leak(model) -> float:
    """How much an example's logits depend on the example packed before it in the same row.

    Padding-free packing is only correct when the attention implementation honours per-example
    position ids (a block-diagonal mask). The same example is run after two different prefixes of
    equal length: with the mask honoured its logits do not change at all (same shapes, same
    kernels, whatever the dtype or quantisation); with a leak they move by the size of logits.
    """
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings  # small test vocabularies too

    def ids(*xs):
        return torch.tensor([[x % vocab for x in xs]], device=device)

    first, other, b = ids(5, 17, 42, 99, 7, 23), ids(61, 8, 300, 12, 77, 1000), ids(11, 13, 19, 3)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3]], device=device)
    out = [model(input_ids=torch.cat([prefix, b], 1), position_ids=pos, use_cache=False).logits[0, first.shape[1]:]
           for prefix in (first, other)]
    return (out[0].float() - out[1].float()).abs().max().item()


def check_packing(model, tolerance: float = 1e-3) -> float:
    was_training = model.training
    model.eval()
    try:
        leak = packing_leak(model)
    finally:
        model.train(was_training)
    if leak > tolerance:
        raise PackingError(
            f"packing would leak attention across examples with this model "
            f"(attn_implementation={getattr(model.config, '_attn_implementation', '?')}): logits move by {leak:.3g}. "
            "Set train.packing: false, or use an attention implementation that honours position_ids (sdpa, "
            "flash_attention_2, flex_attention on transformers >= 5)."
        )
    return leak
