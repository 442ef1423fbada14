"""Stage 05, part one: merge the LoRA adapter into the base weights and save a normal model."""

from __future__ import annotations

import torch

from .masking import encode_prompt
from .modeling import stop_token_ids
from .paths import RunPaths


@torch.no_grad()
def prompt_logits(model, tokenizer, prompts: list[list[dict]]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    return [model(input_ids=torch.tensor([encode_prompt(tokenizer, p)], device=device)).logits.float().cpu()
            for p in prompts]


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def merge_adapter(cfg, paths: RunPaths, check_prompts: list[list[dict]]) -> dict:
    """Merge the adapter into the base weights, save, and verify the merge on real prompts.

    The check compares logits of base + adapter (before merging) with the merged model's, and
    also reports how far the adapter moved the logits from the base model's, so that a passing
    check is not vacuous.
    """
    from .train import load_adapter_model, trained_info

    model, tok = load_adapter_model(cfg, paths)
    if trained_info(paths).get("method") == "full":  # nothing to merge: the weights are the model
        model.save_pretrained(paths.merged_dir)
        tok.save_pretrained(paths.merged_dir)
        return {"merged_dir": str(paths.merged_dir), "max_logit_diff_merged_vs_adapter": 0.0,
                "relative_logit_diff": 0.0, "relative_tolerance": 0.0, "top1_agreement": 1.0,
                "max_logit_diff_adapter_vs_base": None, "merge_check_passed": True,
                "stop_token_ids": stop_token_ids(tok), "note": "full fine-tune: saved as is"}
    tuned = prompt_logits(model, tok, check_prompts)
    with model.disable_adapter():
        base = prompt_logits(model, tok, check_prompts)
    merged = model.merge_and_unload()
    merged.generation_config.eos_token_id = stop_token_ids(tok)
    merged.generation_config.pad_token_id = tok.pad_token_id
    merged.config.pad_token_id = tok.pad_token_id
    merged.save_pretrained(paths.merged_dir)
    tok.save_pretrained(paths.merged_dir)
    merged_logits = prompt_logits(merged, tok, check_prompts)
    diff = max_abs_diff(tuned, merged_logits)
    scale = max(x.abs().max().item() for x in tuned)
    # merging rounds W + BA to the weights' dtype once: allow that rounding, relative to the logits' size
    tolerance = 1e-4 if next(merged.parameters()).dtype == torch.float32 else 2e-2
    same_top1 = min((a.argmax(-1) == b.argmax(-1)).float().mean().item() for a, b in zip(tuned, merged_logits,
                                                                                         strict=True))
    return {"merged_dir": str(paths.merged_dir), "max_logit_diff_merged_vs_adapter": diff,
            "relative_logit_diff": diff / scale, "relative_tolerance": tolerance,
            "top1_agreement": same_top1, "max_logit_diff_adapter_vs_base": max_abs_diff(tuned, base),
            "merge_check_passed": diff / scale <= tolerance, "stop_token_ids": stop_token_ids(tok)}
