"""The demo pipeline (stages 01-05 through the same functions the notebooks call) on a GPU, on a
real architecture with random weights, for several training methods; prints a JSON summary.

Speed and memory do not depend on the weights' values, so a random SmolLM2-1.7B-shaped model with
SmolLM2's real tokenizer stands in for a downloaded checkpoint. Quality is shown on CPU with the
embedded model. Run: python bench/gpu_demo.py --tokenizer DIR [--methods lora,qlora] [--steps 60]
"""

import argparse
import json
import time
from pathlib import Path

import torch

ARCHS = {  # real architecture shapes
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, max_position_embeddings=8192, rope_theta=130000.0,
                         tie_word_embeddings=True),
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, max_position_embeddings=4096, rope_theta=10000.0,
                           tie_word_embeddings=False),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                         tie_word_embeddings=True),
}


def build_model(arch: str, tokenizer_dir: str, out: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ftkit.core.modeling import prepare_tokenizer, set_generation_config

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    prepare_tokenizer(tok)
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **ARCHS[arch])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    set_generation_config(model, tok)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def run(method: str, model_dir: Path, out: Path, steps: int, through_stage: int = 5, num_processes: int = 1,
        accelerate_config: str | None = None) -> dict:
    from ftkit.convert import conversion
    from ftkit.core.config import load_config
    from ftkit.core.paths import RunPaths
    from ftkit.data import dataset as data
    from ftkit.evaluate import evaluation as evaluate
    from ftkit.host import client as host
    from ftkit.host import merge as export
    from ftkit.train import launch

    cfg = load_config(experiment=f"gpu-{method}", outputs_dir=str(out), model={"name": str(model_dir)},
                      train={"method": method, "max_steps": steps, "batch_size": 8, "learning_rate": 2e-4,
                             "eval_steps": 20, "logging_steps": 10, "num_processes": num_processes,
                             "accelerate_config": accelerate_config},
                      evaluate={"num_generations": 32, "max_new_tokens": 80, "batch_size": 32})
    paths = RunPaths(out, cfg.experiment)
    times = {}
    t = time.perf_counter()
    prep = data.prepare(cfg.data, paths, cfg.seed)
    times["01_data_prep"] = time.perf_counter() - t
    t = time.perf_counter()
    tok = conversion.run_tokenizer(cfg, paths)
    conversion.convert(cfg, paths, tok)
    times["02_format_conversion"] = time.perf_counter() - t
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    m3 = launch.train(cfg, paths)
    times["03_train"] = time.perf_counter() - t
    torch.cuda.empty_cache()
    pre = m3["preflight"]
    trained = {
        "method": method, "rows_kept": prep.rows_kept, "stage_seconds": times,
        "train": {k: m3[k] for k in ("steps", "train_loss", "eval_loss", "train_tokens", "tokens_per_second",
                                     "peak_memory_mb", "trainable_params", "total_params", "runtime_s")},
        "device_plan": m3.get("device_plan"),
        "preflight_estimate_gb": pre["total_gb"], "measured_peak_gb": m3["peak_memory_mb"] / 1024,
        "estimate_over_measured": pre["total_gb"] / (m3["peak_memory_mb"] / 1024),
        "load_peak_gb": m3["load_peak_memory_mb"] / 1024, "train_peak_gb": (m3["train_peak_memory_mb"] or 0) / 1024,
        "held_before_gb": (m3["memory_held_before_mb"] or 0) / 1024,
        "preflight_parts_gb": {k: pre[k] for k in ("weights_gb", "trainable_state_gb", "activations_gb")},
    }
    if num_processes > 1:  # each rank's trained parameters at the end (they must agree)
        trained["ranks"] = [json.loads(f.read_text()) for f in sorted((paths.root / "logs").glob("rank*.json"))]
    if through_stage < 4:
        return trained
    t = time.perf_counter()
    m4 = evaluate.evaluate_run(cfg, paths)
    times["04_evaluate"] = time.perf_counter() - t
    t = time.perf_counter()
    m5 = export.merge_adapter(cfg, paths, host.check_prompts(paths))
    times["05_merge"] = time.perf_counter() - t
    return {
        **trained,
        "eval": {k: {x: m4[k][x] for x in ("loss", "stop_rate", "mean_new_tokens")} for k in ("base", "prompted", "tuned")},
        "merge": {k: m5[k] for k in ("max_logit_diff_merged_vs_adapter", "relative_logit_diff", "relative_tolerance",
                                     "top1_agreement", "max_logit_diff_adapter_vs_base", "merge_check_passed")},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--arch", default="smollm2-1.7b", help=f"comma-separated, of {', '.join(sorted(ARCHS))}")
    ap.add_argument("--methods", default="lora,qlora")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default="/tmp/ftkit-gpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--through-stage", type=int, default=5, help="3: stop after training (memory/speed check)")
    ap.add_argument("--num-processes", type=int, default=1, help="GPUs: stage 03 through `accelerate launch`")
    ap.add_argument("--accelerate-config", default=None, help="a template (ddp, fsdp, deepspeed-zero2/3) or a file")
    args = ap.parse_args()
    out = Path(args.out)
    summary = {"gpu": torch.cuda.get_device_name(0),
               "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                            "peft": __import__("peft").__version__}, "runs": []}
    for arch in args.arch.split(","):
        model_dir = build_model(arch, args.tokenizer, out / f"model-{arch}")
        for m in args.methods.split(","):
            summary["runs"].append({"arch": arch, **run(m, model_dir, out / arch, args.steps, args.through_stage,
                                                        args.num_processes, args.accelerate_config)})
            torch._dynamo.reset()  # compiled graphs hold the finished model's modules
            torch.cuda.empty_cache()
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
