"""The transformers Trainer with its per-step host work trimmed, for stage 03's GPU path.

On a small model the GPU finishes a step's kernels about as fast as Python can launch them, so host
work between kernels is lost throughput. Every optimizer step the stock Trainer walks the model's
whole module tree four times, to do what changes nothing after the first step:

* ``model.train()`` at every micro-batch sets the training flag on every module (2,333 modules for a
  28-layer model with LoRA on all linear layers);
* ``floating_point_ops`` counts the parameters again (``num_parameters``) for the ``total_flos`` log;
* the gradient clipping and ``model.zero_grad()`` each list every parameter, frozen or not.

On a 2-core CPU those walks take 9.6, 7.2, 4.9 and 4.3 ms a step for that model; a Qwen2.5-1.5B step
on an H200 takes ~250 ms, bound by the host. :class:`LeanTrainer` does the same with lists made once:
the same flags, the same count, the same gradients clipped and cleared. It also counts input tokens
from tensor shapes (no device-to-host copy). Multi-process runs (DDP, FSDP, DeepSpeed) keep the stock
code, whose wrapped models and sharded parameters those lists would not follow.
"""

from __future__ import annotations

import torch
from accelerate.utils import DistributedType
from transformers import PreTrainedModel, Trainer

# classes whose train() only sets the flags (transformers' own acts only when the mode changes); a
# module with any other train() (PEFT's DoRA layers clear a cache there) keeps the stock call
_FLAG_ONLY_TRAIN = {torch.nn.Module.train, PreTrainedModel.train}


class LeanTrainer(Trainer):
    """:class:`transformers.Trainer` with the host work above done once (one process only)."""

    def _lean(self) -> bool:
        return self.args.world_size == 1 and self.accelerator.distributed_type == DistributedType.NO

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._lean():
            install_quick_walks(model)
        return super().training_step(model, inputs, num_items_in_batch)

    def floating_point_ops(self, inputs) -> int:
        if not self._lean() or "input_ids" not in inputs or not hasattr(self.model, "num_parameters"):
            return super().floating_point_ops(inputs)
        if getattr(self, "_ftkit_flop_params", None) is None:
            self._ftkit_flop_params = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs["input_ids"].numel() * self._ftkit_flop_params

    def _clip_grad_norm(self, model):
        walks = model.__dict__.get("_ftkit_walks")
        if not self._lean() or walks is None:
            return super()._clip_grad_norm(model)
        # the parameters that can have a gradient: torch's clipping skips the others anyway
        return self.accelerator.clip_grad_norm_(walks.trainable, self.args.max_grad_norm)

    def _track_num_input_tokens(self, inputs):
        """Counted from tensor shapes: the stock count moves the number to the GPU and back every
        step, a host sync that stalls the queue of kernels."""
        if (self.args.world_size > 1 or self.args.include_num_input_tokens_seen not in (True, "all")
                or "input_ids" not in inputs):
            return super()._track_num_input_tokens(inputs)
        self.state.num_input_tokens_seen += inputs["input_ids"].numel()

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            for m in {self.model, self.model_wrapped}:
                if m is not None:
                    remove_quick_walks(m)


class _Walks:
    """The module and parameter lists of one model, made once."""

    def __init__(self, model: torch.nn.Module):
        self.modules = list(model.modules())
        self.params = list(model.parameters())
        self.trainable = [p for p in self.params if p.requires_grad]
        self.flag_only = all(type(m).train in _FLAG_ONLY_TRAIN for m in self.modules)


def install_quick_walks(model: torch.nn.Module) -> None:
    """Give ``model`` (the instance, not its class) a ``train`` that returns at once when every
    module already has the asked-for flag, and a ``zero_grad`` over the parameter list made once.
    The end state is what the stock methods leave; undone by :func:`remove_quick_walks`."""
    if "_ftkit_walks" in model.__dict__:
        return
    walks = _Walks(model)
    stock_train, stock_zero_grad = type(model).train, type(model).zero_grad

    def train(mode: bool = True):
        if walks.flag_only and all(m.training is mode for m in walks.modules):
            return model
        return stock_train(model, mode)

    def zero_grad(set_to_none: bool = True):
        if not set_to_none:
            return stock_zero_grad(model, set_to_none)
        for p in walks.params:
            if p.grad is not None:
                p.grad = None

    # plain attributes on the instance (nn.Module keeps non-tensor values in __dict__)
    object.__setattr__(model, "_ftkit_walks", walks)
    object.__setattr__(model, "train", train)
    object.__setattr__(model, "zero_grad", zero_grad)


def remove_quick_walks(model: torch.nn.Module) -> None:
    for name in ("_ftkit_walks", "train", "zero_grad"):
        model.__dict__.pop(name, None)
