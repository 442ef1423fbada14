"""The training benchmark's MFU numerator (``bench/train_throughput.py``) against the FLOPs PyTorch
counts when a LoRA model runs forward and backward: the formula is checked, not trusted."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import train_throughput as tt  # noqa: E402

TINY = ("llama", dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=256,
                      tie_word_embeddings=False))


@pytest.mark.parametrize("method,prompt", [("lora", 0), ("lora", 7), ("full", 7)])
def test_useful_flops_equal_the_counted_matmuls(monkeypatch, method, prompt):
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoConfig, AutoModelForCausalLM

    monkeypatch.setitem(tt.ARCHS, "tiny", TINY)
    config = AutoConfig.for_model(TINY[0], **TINY[1])
    config._attn_implementation = "eager"  # attention as plain matrix products over the full L x L square
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if method == "lora":
        model.enable_input_require_grads()  # activation gradients reach the first layer, as the formula counts
        model = get_peft_model(model, LoraConfig(r=tt.LORA["r"], lora_alpha=tt.LORA["alpha"],
                                                 target_modules="all-linear"))

    L = 24
    ids = torch.randint(0, 300, (1, L))
    labels = ids.clone()
    labels[0, :prompt] = -100
    trained = int((labels[0, 1:] != -100).sum())  # positions whose next token is trained
    keep = (labels[0, 1:] != -100).nonzero().reshape(-1)  # the LM head only there, as ftkit's GPU path
    with FlopCounterMode(display=False) as counter:
        out = model(input_ids=ids, labels=labels, logits_to_keep=keep, shift_labels=labels[:, 1:][:, keep])
        out.loss.backward()
    counted = counter.get_total_flops()

    s = tt.shape_numbers("tiny")
    # eager attention multiplies the whole square: 4 products of 2*L*L*d_attn (QK^T, PV, forward; twice
    # that backward) per layer; the benchmark counts each example's causal triangle instead
    square = 3 * 4 * L * L * s["d_attn"] * s["layers"]
    triangle = 6 * L * (L + 1) * s["d_attn"] * s["layers"]
    # transformers 5.17 builds the rotary angles as a matrix product (inv_freq x positions, 2*(d_head/2)*L
    # FLOPs, once a forward), later versions elementwise; neither is model work the benchmark counts
    d_head = TINY[1]["hidden_size"] // TINY[1]["num_attention_heads"]
    rotary = 2 * (d_head // 2) * L
    assert tt.useful_flops([(L, trained)], "tiny", method) - triangle in (counted - square, counted - square - rotary)


def test_every_ablation_is_a_bench_switch_or_valid_train_config():
    """An ablation with a misspelt key would fail only on the GPU, after its device time is spent."""
    from ftkit.core.config import load_config

    for overrides in tt.ABLATIONS.values():
        config_keys = {k: v for k, v in overrides.items() if k not in tt.BENCH_SWITCHES and k != "lora_dropout"}
        load_config(train=config_keys)  # raises ConfigError naming the key (an unknown one too)
