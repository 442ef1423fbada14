"""ftkit.train.lean_trainer: the Trainer with its per-step module walks done once must train exactly as the
stock Trainer does (same losses, gradient norms, clipping, dropout on after evaluation, same weights)."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from ftkit.train.lean_trainer import LeanTrainer, install_quick_walks, remove_quick_walks


def _lora_model(dropout=0.1, dora=False):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                           target_modules="all-linear", use_dora=dora))


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.rows = [torch.randint(0, 128, (12,), generator=g) for _ in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i].clone()}


def _train(trainer_class, tmp_path, name):
    model = _lora_model()
    args = TrainingArguments(output_dir=str(tmp_path / name), max_steps=6, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=1e-2, max_grad_norm=0.05,
                             eval_strategy="steps", eval_steps=2, logging_steps=1, save_strategy="no",
                             seed=0, data_seed=0, use_cpu=True, report_to=[], disable_tqdm=True,
                             include_num_input_tokens_seen=True)
    trainer = trainer_class(model=model, args=args, train_dataset=_Rows(24, 1), eval_dataset=_Rows(4, 2))
    seen = []
    trainer.add_callback(type("Seen", (TrainerCallback,), {
        "on_step_end": lambda self, args, state, control, model=None, **kw: seen.append("_ftkit_walks" in model.__dict__)}))
    trainer.train()
    assert seen == [trainer_class is LeanTrainer] * 6  # the lean path ran (or, stock, did not)
    logs = [(h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h]
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    weights = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    return trainer, model, logs, evals, weights


def test_lean_trainer_trains_exactly_as_the_stock_one(tmp_path):
    _, _, logs, evals, weights = _train(Trainer, tmp_path, "stock")
    trainer, model, lean_logs, lean_evals, lean_weights = _train(LeanTrainer, tmp_path, "lean")
    assert len(logs) == 6 and len(evals) == 3
    # clipping was active (norms above max_grad_norm), dropout was on after each evaluation
    assert all(g > 0.05 for _, g in logs)
    assert lean_logs == logs and lean_evals == evals
    assert lean_weights.keys() == weights.keys()
    assert all(torch.equal(lean_weights[k], weights[k]) for k in weights)
    assert trainer.state.total_flos > 0 and trainer.state.num_input_tokens_seen == 6 * 4 * 12
    # the instance attributes are gone once training ends
    assert not {"_ftkit_walks", "train", "zero_grad"} & set(model.__dict__)


def test_quick_train_leaves_the_flags_the_stock_one_leaves():
    model = _lora_model()
    install_quick_walks(model)
    model.eval()
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())
    # a submodule switched by hand is switched back, as the stock train() does
    dropout = next(m for m in model.modules() if isinstance(m, torch.nn.Dropout))
    dropout.eval()
    model.train()
    assert dropout.training
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    remove_quick_walks(model)
    assert "train" not in model.__dict__


def test_modules_with_their_own_train_get_the_stock_call(monkeypatch):
    from peft.tuners.lora.dora import DoraLinearLayer

    model = _lora_model(dora=True)
    calls = []
    stock = DoraLinearLayer.train
    monkeypatch.setattr(DoraLinearLayer, "train", lambda self, mode=True: (calls.append(mode), stock(self, mode))[1])
    install_quick_walks(model)
    assert not model._ftkit_walks.flag_only
    model.train()
    assert calls  # DoRA clears its cache in train(): never skipped
