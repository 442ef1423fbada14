"""Stage 05, part one: merge the LoRA adapter into the base weights and save a normal model."""

from __future__ import annotations

import torch

from ftkit.core.files import atomic
from ftkit.core.masking import encode_prompt
from ftkit.core.modeling import stop_token_ids
from ftkit.core.paths import RunPaths


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
    from ftkit.core.trained import load_adapter_model, trained_info

    model, tok = load_adapter_model(cfg, paths, full_precision=True)
    method = trained_info(paths).get("method", "lora")
    if method == "full":  # nothing to merge: the weights are the model
        model.generation_config.eos_token_id = stop_token_ids(tok)
        save_model_dir(model, tok, paths.merged_dir)
        return {"merged_dir": str(paths.merged_dir), "method": method, "max_logit_diff_merged_vs_adapter": 0.0,
                "relative_logit_diff": 0.0, "relative_tolerance": 0.0, "top1_agreement": 1.0,
                "max_logit_diff_adapter_vs_base": None, "merge_check_passed": True,
                "stop_token_ids": stop_token_ids(tok), "note": "full fine-tune: saved as is",
                **check_saved_model(paths.merged_dir, tok)}
    tuned = prompt_logits(model, tok, check_prompts)
    with model.disable_adapter():
        base = prompt_logits(model, tok, check_prompts)
    merged = model.merge_and_unload()
    quantised = [n for n, m in merged.named_modules() if "4bit" in type(m).__name__ or "8bit" in type(m).__name__]
    if quantised:  # load_adapter_model loads the base in full precision, QLoRA included; keep it that way
        raise RuntimeError(f"the merged model still has quantised layers ({quantised[:3]}...): a QLoRA adapter must be "
                           "merged into the base in its original precision, not into de-quantised 4-bit weights")
    merged.generation_config.eos_token_id = stop_token_ids(tok)
    merged.generation_config.pad_token_id = tok.pad_token_id
    merged.config.pad_token_id = tok.pad_token_id
    save_model_dir(merged, tok, paths.merged_dir)
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
            "merge_check_passed": diff / scale <= tolerance, "stop_token_ids": stop_token_ids(tok),
            "method": method, "merged_dtype": str(next(merged.parameters()).dtype).removeprefix("torch."),
            **check_saved_model(paths.merged_dir, tok)}


def save_model_dir(model, tokenizer, out) -> None:
    """``model`` and ``tokenizer`` saved as one directory, written beside ``out`` and renamed into place:
    a merge killed or out of disk midway leaves the previous ``merged/`` (or none), never half a model that
    ``ftkit serve`` or the GGUF converter would take. The space is checked first (weights' bytes plus 10%)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    with atomic(out, directory=True, needed_bytes=int(weights * 1.1)) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def check_saved_model(model_dir, tokenizer) -> dict:
    """Read the saved directory back: its generation config stops on the end-of-turn token and its
    chat template is the one training used (the two causes of "gibberish after export")."""
    from transformers import AutoTokenizer, GenerationConfig

    from ftkit.core.masking import end_of_turn_token_id

    eot = end_of_turn_token_id(tokenizer)
    eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    saved_template = AutoTokenizer.from_pretrained(model_dir).chat_template
    out = {"end_of_turn_token": tokenizer.convert_ids_to_tokens(eot), "saved_eos_token_ids": eos,
           "saved_eos_includes_end_of_turn": eot in eos,
           "saved_chat_template_matches": saved_template == tokenizer.chat_template}
    if not (out["saved_eos_includes_end_of_turn"] and out["saved_chat_template_matches"]):
        raise RuntimeError(f"{model_dir}: the saved model would not stop or not render like training: {out}")
    return out
