"""The fused LoRA A products (ftkit.train.lora_fusion): the same losses and gradients as PEFT's own layers,
PEFT's path when the adapter is off, and only where the maths is unchanged (no dropout, no DoRA)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def _model(dropout=0.0, dora=False):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=101)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                             lora_dropout=dropout, use_dora=dora))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)  # B = 0 would hide a wrong A path
    return model


def _loss_and_grads(model, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fused_a_products_give_peft_s_losses_and_gradients():
    from ftkit.train.lora_fusion import fuse_lora_a

    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(1))
    plain, fused = _model(), _model()
    assert fuse_lora_a(fused) == 4  # q/k/v and gate/up in each of the 2 layers
    loss, grads = _loss_and_grads(plain, ids)
    loss_f, grads_f = _loss_and_grads(fused, ids)
    assert loss_f == pytest.approx(loss, abs=1e-6)
    assert grads.keys() == grads_f.keys() and len(grads) == 28
    assert max(float((grads[n] - grads_f[n]).abs().max()) for n in grads) < 1e-6
    with torch.no_grad(), plain.disable_adapter(), fused.disable_adapter():  # the reference of DPO
        assert torch.equal(plain(input_ids=ids).logits, fused(input_ids=ids).logits)
        base = fused(input_ids=ids).logits
    with torch.no_grad():
        assert not torch.equal(fused(input_ids=ids).logits, base)  # the adapter is on again


def test_layers_called_out_of_order_are_refused():
    from ftkit.train.lora_fusion import fuse_lora_a

    model = _model()
    fuse_lora_a(model)
    attn = model.base_model.model.model.layers[0].self_attn
    x = torch.randn(1, 3, 64)
    attn.q_proj(x)
    with pytest.raises(RuntimeError, match="not called in order on one input"):
        attn.k_proj(torch.randn(1, 3, 64))


def test_only_plain_lora_without_dropout_is_fused():
    from ftkit.core.config import load_config
    from ftkit.train.lora_fusion import fuse_lora_a
    from ftkit.train.plan import device_plan

    assert fuse_lora_a(_model(dropout=0.1)) == 0 and fuse_lora_a(_model(dora=True)) == 0
    assert device_plan(load_config()).fused_lora_a  # the default: LoRA, dropout 0
    assert not device_plan(load_config(train={"lora": {"dropout": 0.05}})).fused_lora_a
    assert not device_plan(load_config(train={"method": "dora"})).fused_lora_a
    assert not device_plan(load_config(train={"num_processes": 2})).fused_lora_a  # ZeRO-3 shards per module
