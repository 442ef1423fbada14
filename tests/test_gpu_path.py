"""ftkit's GPU path (train.device_plan): the choices per device, and the varlen attention's plumbing.

The varlen flash kernel runs only on CUDA; on CPU it is replaced by a reference (SDPA on each
example) so the code around it (boundaries from the collator or from position ids, grouped-query
heads, the layout handed back to the model) is checked without a GPU. The same check on the real
kernel is the GPU test at the end (``pytest -m gpu``).
"""

import dataclasses

import pytest
import torch

from ftkit.core import batches
from ftkit.core.config import load_config
from ftkit.core.masking import IGNORE_INDEX
from ftkit.train import kernels, packing, trainer
from ftkit.train import plan as planning
from ftkit.train.plan import Applied


def test_cpu_plan():
    plan = planning.device_plan(load_config(model={"device": "cpu"}))
    assert plan.to_dict() == {"device": "cpu", "optimizer": "adamw_torch", "gradient_checkpointing": False,
                    "attention": "varlen", "kernels": "none", "compile": False, "merge_accumulation": False,
                    "trained_logits_only": True, "micro_batch": 4, "accumulation": 1, "fused_lora_a": True}
    unpacked = planning.device_plan(load_config(model={"device": "cpu"}, train={"packing": False}))
    assert (unpacked.attention, unpacked.trained_logits_only) == ("sdpa", False)
    assert planning.device_plan(load_config(model={"device": "cpu"}, train={"method": "qlora"})).gradient_checkpointing \
        is False


def test_compile_with_liger_is_refused():
    from ftkit.core.config import ConfigError

    with pytest.raises(ConfigError, match="train.kernels: 'liger' cannot run inside compiled layers"):
        load_config(train={"compile": True, "kernels": "liger"})


def test_explicit_choices_win():
    cfg = load_config(model={"device": "cpu"}, train={"optimizer": "sgd", "gradient_checkpointing": True})
    plan = planning.device_plan(cfg)
    assert plan.optimizer == "sgd" and plan.gradient_checkpointing is True


def test_cuda_plan(monkeypatch):
    monkeypatch.setattr(kernels, "varlen_fn", lambda: object())
    monkeypatch.setattr(kernels, "liger_available", lambda: True)
    plan = planning.device_plan(load_config(model={"device": "cuda"}))
    assert plan.to_dict() == {"device": "cuda", "optimizer": "adamw_torch_fused", "gradient_checkpointing": False,
                    "attention": "varlen", "kernels": "none", "compile": True, "merge_accumulation": False,
                    "trained_logits_only": True, "micro_batch": 4, "accumulation": 1, "fused_lora_a": True}
    # Liger's kernels where the layers stay eager: compile switched off, or a run too short
    # to win back the compile time
    cuda = load_config(model={"device": "cuda"})
    p = planning.device_plan(load_config(model={"device": "cuda"}, train={"compile": False}))
    assert (p.compile, p.kernels) == (False, "liger")
    assert (planning.device_plan(cuda, est_train_seconds=60).compile, planning.device_plan(cuda, 3600).compile) == (False, True)
    assert planning.device_plan(load_config(model={"device": "cuda"}, train={"compile": True}), 60).compile
    for method in ("full", "dora", "qlora"):  # QLoRA's 4-bit layers compiled too (bench: 1.3x eager, less memory)
        assert planning.device_plan(load_config(model={"device": "cuda"}, train={"method": method})).compile
    assert not planning.device_plan(load_config(model={"device": "cuda"}, train={"num_processes": 2})).compile
    assert planning.device_plan(load_config(model={"device": "cuda"}, train={"gradient_accumulation_steps": 4})
                          ).merge_accumulation
    assert planning.device_plan(load_config(model={"device": "cuda"}, train={"method": "qlora"})).gradient_checkpointing
    assert planning.device_plan(load_config(model={"device": "cuda"}, train={"packing": False})).attention == "sdpa"
    assert not planning.device_plan(load_config(model={"device": "cuda"}, train={"packing": False})).trained_logits_only
    assert not planning.device_plan(load_config(model={"device": "cuda"}, train={"compile": False, "kernels": "liger+loss"})
                              ).trained_logits_only


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """What the flash kernel computes: causal attention inside each [cu[i], cu[i+1]) segment."""
    assert window_size == (-1, 0) and max_q == int(cu_q.diff().max())
    outs = []
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True, scale=scale, enable_gqa=enable_gqa).transpose(0, 1))
    return torch.cat(outs)


@pytest.fixture
def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


@pytest.mark.parametrize("from_collator", [True, False])
def test_varlen_attention_matches_per_example(monkeypatch, tiny_model, from_collator):
    monkeypatch.setattr(kernels, "varlen_fn", lambda: _reference_varlen)
    examples = [[5, 17, 42, 99, 7], [11, 13, 19], [61, 8, 300 - 1, 12, 77, 200, 3]]
    separate = [tiny_model(input_ids=torch.tensor([e])).logits[0].float() for e in examples]
    batch = batches.make_collator(0, packing=True, boundaries=from_collator)(
        [{"input_ids": e, "labels": e} for e in examples])
    assert ("cu_seq_lens_q" in batch) == from_collator
    assert kernels.register_varlen_attention()
    tiny_model.config._attn_implementation = kernels.VARLEN
    batch.pop("labels")
    packed = tiny_model(**batch).logits[0].float()
    assert torch.allclose(packed, torch.cat(separate), atol=0.05), (packed - torch.cat(separate)).abs().max()
    assert packing.packing_leak(tiny_model) == 0.0


def test_cpu_varlen_is_per_example_sdpa(tiny_model):
    """On CPU (float32) the registered attention runs each packed example through SDPA on its own:
    the packed logits are those of the examples run one by one, not merely close."""
    model = tiny_model.float()
    examples = [[5, 17, 42, 99, 7], [11, 13, 19], [61, 8, 299, 12, 77, 200, 3]]
    separate = torch.cat([model(input_ids=torch.tensor([e])).logits[0] for e in examples])
    batch = batches.make_collator(0, packing=True, boundaries=True)([{"input_ids": e, "labels": e} for e in examples])
    batch.pop("labels")
    if not kernels.register_varlen_attention():
        pytest.skip("this torch has no torch.nn.attention.varlen")
    model.config._attn_implementation = kernels.VARLEN
    packed = model(**batch).logits[0]
    assert torch.allclose(packed, separate, atol=1e-5), (packed - separate).abs().max()
    assert packing.packing_leak(model) == 0.0


def test_collator_boundaries():
    batch = batches.make_collator(0, packing=True, boundaries=True)(
        [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}])
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5] and batch["max_length_q"] == 3
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_varlen_kernel_on_gpu(tiny_model):
    model = tiny_model.cuda()
    examples = [[5, 17, 42, 99, 7], [11, 13, 19], [61, 8, 299, 12, 77, 200, 3]]
    separate = torch.cat([model(input_ids=torch.tensor([e], device="cuda")).logits[0].float() for e in examples])
    assert kernels.register_varlen_attention()
    model.config._attn_implementation = kernels.VARLEN
    batch = batches.make_collator(0, packing=True, boundaries=True)([{"input_ids": e, "labels": e} for e in examples])
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items() if k != "labels"}
    assert torch.allclose(model(**batch).logits[0].float(), separate, atol=0.05)


def test_fused_kernels_leave_other_models_alone(monkeypatch, tiny_model):
    """Liger swaps classes in the modeling module; ftkit restores them, so only this model changes."""
    import sys
    import types

    from transformers.models.llama import modeling_llama

    original = modeling_llama.LlamaRMSNorm

    def fake_apply(model, **kw):
        modeling_llama.LlamaRMSNorm = object  # what Liger does module-wide
        model.model.norm.patched = True

    fake = types.ModuleType("liger_kernel.transformers")
    fake._apply_liger_kernel_to_instance = fake_apply
    patch = types.ModuleType("liger_kernel.transformers.monkey_patch")
    patch.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": None}
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", patch)
    assert kernels.apply_fused_kernels(tiny_model)
    assert tiny_model.model.norm.patched and modeling_llama.LlamaRMSNorm is original


def test_fold_accumulation_sizes_micro_batches_by_memory(monkeypatch):
    import types

    import ftkit.core.estimate as est

    # a stand-in estimate: 1 GB per 100 tokens in a micro-batch (half that for compiled layers)
    asked = []

    def fake_estimate(cfg, path, tokens, n, mean, compiled=False, timed=True):
        asked.append(compiled)
        return types.SimpleNamespace(total_gb=cfg.train.batch_size * mean / 100 / (2 if compiled else 1))

    monkeypatch.setattr(est, "estimate", fake_estimate)
    cfg = load_config(model={"device": "cpu"}, train={"batch_size": 2, "gradient_accumulation_steps": 8})
    plan = dataclasses.replace(planning.device_plan(cfg), merge_accumulation=True)
    lengths = [100] * 64
    fits_8 = 8.5 * 1024**3 / 0.9  # room for 8 examples of 100 tokens, not 16
    folded = planning.fold_accumulation(cfg, plan, lengths, int(fits_8))
    assert (folded.micro_batch, folded.accumulation) == (8, 2)
    assert folded.folded_estimate_gb == 8.0  # the estimate for the micro-batch used, not the configured one
    assert planning.fold_accumulation(cfg, plan, lengths, 10**15).micro_batch == 16
    assert planning.fold_accumulation(cfg, dataclasses.replace(plan, merge_accumulation=False), lengths, 10**15).micro_batch == 2
    # compiled layers keep fewer activations: the same memory holds twice the examples
    asked.clear()
    assert planning.fold_accumulation(cfg, dataclasses.replace(plan, compile=True), lengths, int(fits_8)).micro_batch == 16
    assert asked and all(asked)
    # sized by the largest sampled micro-batch, not a typical one: 4 long documents among 60 short ones
    # make some 8-example micro-batches 4x the mean, so 8 no longer fits where uniform lengths did
    skewed = [70] * 60 + [1000] * 4
    assert sum(skewed) / len(skewed) < 130
    assert planning.fold_accumulation(cfg, plan, skewed, int(fits_8)).micro_batch < 8


def test_micro_batches_resized_when_layers_could_not_be_compiled(monkeypatch):
    import types

    import ftkit.core.estimate as est

    monkeypatch.setattr(est, "estimate", lambda cfg, path, tokens, n, mean, compiled=False, timed=True: types.SimpleNamespace(
        total_gb=cfg.train.batch_size * mean / 100 / (2 if compiled else 1)))
    cfg = load_config(model={"device": "cpu"}, train={"batch_size": 2, "gradient_accumulation_steps": 8})
    planned = dataclasses.replace(planning.device_plan(cfg), merge_accumulation=True, compile=True)
    lengths, free = [100] * 64, int(8.5 * 1024**3 / 0.9)
    folded = planning.fold_for_model(cfg, planned, Applied(compiled_layers=30), lengths, free)
    assert folded.micro_batch == 16
    again = planning.fold_for_model(cfg, planned, Applied(compiled_layers=0), lengths, free)
    assert (again.micro_batch, again.accumulation) == (8, 2) and again.compile is False


def test_compiled_layers_use_the_cpp_wrapper_on_cuda_only(monkeypatch, tiny_model):
    """On a GPU the compiled layers launch their kernels from Inductor's C++ wrapper (the host-bound
    step of short examples); elsewhere torch.compile's defaults stay. What was chosen is recorded."""
    calls = []
    monkeypatch.setattr(kernels, "compile_layers", lambda model, **kw: calls.append(kw) or 2)
    monkeypatch.setattr(kernels, "compile_loss", lambda model: True)
    monkeypatch.setattr(kernels, "register_varlen_attention", lambda: False)
    base = dataclasses.replace(planning.device_plan(load_config(model={"device": "cpu"})), compile=True)
    cuda = planning.prepare_for_device(tiny_model, dataclasses.replace(base, device="cuda"))
    cpu = planning.prepare_for_device(tiny_model, base)
    assert calls == [{"options": {"cpp_wrapper": True}}, {}]
    assert (cuda.compile_wrapper, cpu.compile_wrapper) == ("cpp", None)
    assert "compile_wrapper" not in planning.prepare_for_device(
        tiny_model, dataclasses.replace(base, device="cuda", compile=False)).to_dict()


def test_checkpointing_reaches_the_trainer_without_deprecation(tmp_path):
    import warnings

    from transformers import TrainingArguments

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                 **trainer._checkpointing_args(True))
    assert getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing
    assert not [w for w in caught if "gradient_checkpointing" in str(w.message)]


def test_compiled_loss_matches_eager(tiny_model):
    """The loss compiled by the GPU path gives the eager loss and gradients (bf16 logits, summed
    over the trained tokens and divided by their count across an accumulated batch)."""
    model = tiny_model.train()
    ids = torch.randint(3, 1100, (1, 24), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :7] = IGNORE_INDEX
    n_items = torch.tensor(40)  # as the Trainer passes it: trained tokens of all micro-batches

    def run():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=labels, num_items_in_batch=n_items).loss
        loss.backward()
        return loss.detach().float(), model.lm_head.weight.grad.float().clone()

    eager = run()
    assert kernels.compile_loss(model)
    compiled = run()
    assert "_loss_function" in model.__dict__
    assert torch.allclose(eager[0], compiled[0], rtol=1e-4), (eager[0], compiled[0])
    assert torch.allclose(eager[1], compiled[1], rtol=2e-2, atol=1e-5)


def test_trained_positions_same_loss_and_gradients(tiny_model):
    """Logits only where the next token is trained: the packed batch's loss (summed over an
    accumulated batch's trained tokens) and every gradient equal the full-logits path, and the head
    ran on the trained positions alone."""
    model = tiny_model.float().train()
    examples = [[5, 17, 42, 99, 7, 23, 8], [11, 13, 19], [61, 8, 299, 12, 77, 200, 3, 9]]
    rows = [{"input_ids": e, "labels": [IGNORE_INDEX] * p + e[p:]} for e, p in zip(examples, (3, 3, 5), strict=True)]
    n_items = torch.tensor(20)  # as the Trainer passes it: trained tokens of all micro-batches

    def run(trained_only):
        batch = batches.make_collator(0, packing=True, trained_logits_only=trained_only)(rows)
        model.zero_grad(set_to_none=True)
        out = model(**batch, num_items_in_batch=n_items)
        out.loss.backward()
        return batch, out, {n: p.grad.clone() for n, p in model.named_parameters()}

    full_batch, full, full_grads = run(False)
    batch, cut, grads = run(True)
    trained = [2, 3, 4, 5, 14, 15, 16]  # positions whose next token is a trained reply token
    assert batch["logits_to_keep"].tolist() == trained
    assert batch["shift_labels"].tolist() == [[full_batch["labels"][0, i + 1].item() for i in trained]]
    assert cut.logits.shape[1] == len(trained) and full.logits.shape[1] == sum(map(len, examples))
    assert torch.allclose(cut.loss, full.loss, rtol=1e-5), (cut.loss, full.loss)
    for n in full_grads:
        assert torch.allclose(grads[n], full_grads[n], rtol=1e-4, atol=1e-7), n
    # a micro-batch with nothing to train: one position kept, no target, loss 0
    empty = batches.make_collator(0, packing=True, trained_logits_only=True)([{"input_ids": [4, 5], "labels": [-100, -100]}])
    assert empty["shift_labels"].tolist() == [[IGNORE_INDEX]]
    assert model(**empty, num_items_in_batch=n_items).loss.item() == 0.0


def test_memory_budget_turns_checkpointing_on_only_where_needed(monkeypatch):
    """train.max_memory_gb: checkpointing left to auto goes on when the configured micro-batch would not
    fit the budget without it, stays off when it fits, and an explicit false is never overridden."""
    import types

    import ftkit.core.estimate as est

    # a stand-in estimate: 1 GB per 100 tokens in a micro-batch, a quarter of that under checkpointing
    monkeypatch.setattr(est, "estimate", lambda cfg, path, tokens, n, mean, compiled=False, timed=True: types.SimpleNamespace(
        total_gb=cfg.train.batch_size * mean / 100 / (4 if cfg.train.gradient_checkpointing else 1)))
    lengths = [100] * 64

    def plan(budget_gb, **train):
        cfg = load_config(model={"device": "cpu"}, train={"batch_size": 8, "gradient_accumulation_steps": 4,
                                                          "max_memory_gb": budget_gb, **train})
        p = dataclasses.replace(planning.device_plan(cfg), merge_accumulation=True)
        return planning.fold_accumulation(cfg, p, lengths, int(budget_gb * 1024**3))

    roomy = plan(100)  # 8 examples need 8 GB: fits, folded to 32 x 1 without checkpointing
    assert (roomy.gradient_checkpointing, roomy.micro_batch) == (False, 32)
    tight = plan(6)  # 8 GB without checkpointing > 0.9 x 6; 2 GB with it: on, and folded where it fits
    assert tight.gradient_checkpointing is True and (tight.micro_batch, tight.accumulation) == (16, 2)
    assert plan(6, gradient_checkpointing=False).gradient_checkpointing is False  # the user's choice stands
    assert plan(6, gradient_checkpointing=False).micro_batch == 8


def test_preflight_under_a_budget_counts_the_checkpointing_the_plan_would_turn_on():
    """A budget that fits only with checkpointing: left to auto, the pre-flight judges the checkpointed run
    (what the device plan then runs) and lets it start; an explicit false is refused."""
    from ftkit.core.estimate import PreflightError, estimate, preflight
    from ftkit.core.modeling import resolve_model_path

    lengths = [400] * 64

    def est(**train):
        cfg = load_config(model={"device": "cpu"}, train={"batch_size": 32, **train})
        return estimate(cfg, resolve_model_path(cfg.model.name), sum(lengths), len(lengths), 400).total_gb

    eager, checkpointed = est(), est(gradient_checkpointing=True)
    assert checkpointed < eager
    budget = (eager + checkpointed) / 2
    auto = load_config(model={"device": "cpu"}, train={"batch_size": 32, "max_memory_gb": budget})
    assert preflight(auto, None, free_bytes=64 * 1024**3, lengths=lengths)["total_gb"] == pytest.approx(checkpointed)
    off = load_config(model={"device": "cpu"}, train={"batch_size": 32, "max_memory_gb": budget,
                                                      "gradient_checkpointing": False})
    with pytest.raises(PreflightError, match="train.max_memory_gb allows"):
        preflight(off, None, free_bytes=64 * 1024**3, lengths=lengths)


def test_memory_budget_caps_the_preflight_and_says_so(tmp_path):
    from ftkit.core.estimate import PreflightError, preflight

    cfg = load_config(model={"device": "cpu"}, train={"max_memory_gb": 0.05})
    with pytest.raises(PreflightError, match=r"train.max_memory_gb allows 0.05 GB.*a larger train.max_memory_gb"):
        preflight(cfg, None, free_bytes=64 * 1024**3, lengths=[200] * 100)
    roomy = preflight(load_config(model={"device": "cpu"}, train={"max_memory_gb": 20}), None,
                      free_bytes=64 * 1024**3, lengths=[200] * 100)
    assert roomy["free_gb"] == 20
    with pytest.raises(Exception, match=r"train.max_memory_gb: must be positive"):
        load_config(train={"max_memory_gb": 0})
