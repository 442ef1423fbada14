"""The pieces of a training run that callers may replace: a :class:`Recipe` passed to
:func:`ftkit.train.training.run_training` (the benchmark subclasses it to time or switch off a piece),
so nothing outside this package patches module attributes.

Each method's default is what stage 03 does.
"""

from __future__ import annotations


class Recipe:
    """Stage 03's defaults. Override a method to change one piece of a run."""

    lean_trainer = True
    """On a GPU, one process: :class:`ftkit.train.lean_trainer.LeanTrainer` (the Trainer's per-step module
    walks done once); False keeps the stock walks."""

    def collator(self, pad_token_id: int, packing: bool, *, boundaries: bool, trained_logits_only: bool):
        from ftkit.core.batches import make_collator

        return make_collator(pad_token_id, packing, boundaries=boundaries, trained_logits_only=trained_logits_only)

    def check_fits(self, estimate, cfg, free_bytes: int) -> None:
        """Stop before loading when the pre-flight estimate does not fit (:func:`ftkit.core.estimate.check_fits`)."""
        from ftkit.core.estimate import check_fits

        check_fits(estimate, cfg, free_bytes)

    def add_adapters(self, model, cfg):
        from ftkit.train.loading import add_lora

        return add_lora(model, cfg)

    def fuse_lora_a(self, model) -> int:
        """One product for the LoRA A projections sharing an input (:func:`ftkit.train.lora_fusion.fuse_lora_a`)."""
        from ftkit.train.lora_fusion import fuse_lora_a

        return fuse_lora_a(model)

    def register_attention(self) -> bool:
        """The varlen attention for packed examples (:func:`ftkit.train.kernels.register_varlen_attention`)."""
        from ftkit.train.kernels import register_varlen_attention

        return register_varlen_attention()

    def compile_layers(self, model, **options) -> int:
        from ftkit.train.kernels import compile_layers

        return compile_layers(model, **options)

    def trainer(self, trainer):
        """The configured Trainer, before it trains (add callbacks, inspect it); returned as used."""
        return trainer


DEFAULT = Recipe()
