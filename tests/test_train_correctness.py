"""Classic training failures, checked: gradient accumulation normalisation and reproducibility."""

import pytest
import torch
from conftest import EXACT_MODEL

from ftkit.core.config import load_config
from ftkit.train.loading import add_lora
from ftkit.train.trainer import build_trainer, load_tokens, set_seed


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_converted):
    from conftest import TINY_DEMO_SIZE, copy_run

    from ftkit.core.modeling import load_tokenizer

    out = tmp_path_factory.mktemp("tc")
    cfg = load_config(experiment="tc", outputs_dir=str(out), model=EXACT_MODEL,
                      data={"demo_size": TINY_DEMO_SIZE})
    paths = copy_run(tiny_converted, out, cfg.experiment)
    return cfg, paths, load_tokenizer(str(paths.tokenizer_dir))


def _one_step(prepared, batch: int, accum: int, rows: list[dict], tmp: str):
    from ftkit.core.modeling import load_model, resolve_model_path

    cfg0, paths, tok = prepared
    cfg = load_config(experiment="tc", outputs_dir=cfg0.outputs_dir, model=EXACT_MODEL,
                      train={"batch_size": batch, "gradient_accumulation_steps": accum, "max_steps": 1,
                             "optimizer": "sgd", "learning_rate": 1.0, "warmup_ratio": 0.0,
                             "lr_scheduler": "constant", "max_grad_norm": 1e9, "eval_steps": 0,
                             "lora": {"dropout": 0.0}})
    set_seed(cfg.seed)
    model = add_lora(load_model(resolve_model_path("tiny-random"), cfg.model), cfg)
    trainer = build_trainer(cfg, paths, model, tok, rows, [])
    trainer.args.output_dir = tmp
    # the same 8 examples in the same order either way
    trainer.get_train_dataloader = _fixed_loader(trainer, rows, batch)
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, trainer


def _fixed_loader(trainer, rows, batch):
    def loader():
        return torch.utils.data.DataLoader(rows, batch_size=batch, shuffle=False, collate_fn=trainer.data_collator)
    return loader


def test_gradient_accumulation_matches_full_batch(prepared, tmp_path):
    """batch 8 x accum 1 and batch 2 x accum 4 take the same step: loss normalised per trained token
    over the whole accumulated batch, not averaged per micro-batch (transformers PR 34191)."""
    _, paths, _ = prepared
    rows = load_tokens(paths.tokens("train"))[:8]
    n_trained = [sum(1 for x in r["labels"] if x != -100) for r in rows]
    assert len(set(n_trained)) > 1  # uneven lengths, or the bug could not show
    a, _ = _one_step(prepared, 8, 1, rows, str(tmp_path / "a"))
    b, _ = _one_step(prepared, 2, 4, rows, str(tmp_path / "b"))
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=1e-4), f"{name} differs"


def test_same_seed_same_losses(prepared, tmp_path):
    from ftkit.train.training import run_training

    cfg0, paths, _ = prepared

    def losses(sub):
        cfg = load_config(experiment="tc", outputs_dir=cfg0.outputs_dir, model=EXACT_MODEL,
                          train={"max_steps": 6, "batch_size": 4, "logging_steps": 1, "eval_steps": 0,
                                 "learning_rate": 5e-3, "deterministic": True})
        trainer, _ = run_training(cfg, paths)
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    first, second = losses("a"), losses("b")
    assert len(first) == 6 and first == second


def test_packed_losses_equal_unpacked(prepared):
    """Per-example losses of a packed batch equal those of the same examples run one by one."""
    from ftkit.core.batches import make_collator
    from ftkit.core.modeling import load_model, resolve_model_path
    from ftkit.train.packing import check_packing

    cfg, paths, tok = prepared
    model = load_model(resolve_model_path("tiny-random"), cfg.model)
    rows = load_tokens(paths.tokens("train"))[:4]
    batch = make_collator(tok.pad_token_id, packing=True)(rows)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
    ce = torch.nn.functional.cross_entropy
    start = 0
    for r in rows:
        n = len(r["input_ids"])
        labels = torch.tensor(r["labels"])
        packed_loss = ce(logits[start:start + n - 1], labels[1:], ignore_index=-100)
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([r["input_ids"]]), use_cache=False).logits[0]
        assert torch.allclose(packed_loss, ce(alone[:-1], labels[1:], ignore_index=-100), atol=1e-5)
        start += n
    assert check_packing(model) < 1e-4


def test_packing_guard_catches_a_leaking_attention(prepared):
    """With a KV cache the mask is not made block-diagonal: the guard must notice such a leak."""
    from ftkit.core.modeling import load_model, resolve_model_path
    from ftkit.train.packing import PackingError, check_packing

    cfg, _, _ = prepared
    model = load_model(resolve_model_path("tiny-random"), cfg.model)
    original = model.forward

    def leaky(*args, **kw):
        kw.pop("use_cache", None)
        kw.pop("position_ids", None)  # ignore example boundaries: plain causal attention over the row
        return original(*args, **kw)

    model.forward = leaky
    with pytest.raises(PackingError, match="leak attention across examples"):
        check_packing(model)


def test_logits_only_at_trained_positions_train_the_same(prepared):
    """The Trainer with the LM head and loss only at trained positions (the GPU default) logs the
    losses of the full-logits path, with accumulation over micro-batches and in evaluation."""
    from ftkit.train.training import run_training

    cfg0, paths, _ = prepared

    def run(on):
        cfg = load_config(experiment="tc", outputs_dir=cfg0.outputs_dir, model=EXACT_MODEL,
                          train={"max_steps": 4, "batch_size": 2, "gradient_accumulation_steps": 2, "logging_steps": 1,
                                 "eval_steps": 0, "learning_rate": 5e-3, "deterministic": True,
                                 "trained_logits_only": on})
        trainer, metrics = run_training(cfg, paths)
        assert metrics["device_plan"]["applied_trained_logits_only"] is on
        return [h["loss"] for h in trainer.state.log_history if "loss" in h], metrics["eval_loss"]

    (full, full_eval), (cut, cut_eval) = run(False), run(True)
    assert len(full) == 4 and full[-1] < full[0]
    assert cut == pytest.approx(full, rel=1e-4) and cut_eval == pytest.approx(full_eval, rel=1e-4)
