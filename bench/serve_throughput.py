"""Serving speed on one GPU: ftkit's OpenAI-compatible server under 1 to 64 concurrent streamed chat requests,
against the memory-bandwidth bound of decoding.

For each model shape (Llama-3.1-8B, Qwen2.5-1.5B; random weights, SmolLM2's tokenizer and chat template) it
starts :func:`ftkit.host.serve.make_server` (the server ``ftkit serve DIR`` runs) on a model directory in this
process, on a thread, and sends waves of ``N`` concurrent streamed ``/v1/chat/completions`` requests (greedy,
``max_tokens`` fixed, ~200-token prompts of random words, each request its own prompt) from a separate client
process (raw HTTP, one thread a request), so the load generator does not share the server's interpreter.
Per wave: TTFT p50/p95 (request sent to first content chunk), decode tokens/s per request (its tokens after the
first over the time after its first chunk; median), total tokens/s (all reply tokens over the wave's span),
and the bound:

    bound(N) = N * B / (W + N * kv * (P + T / 2))

tokens/s, with ``B`` the device-to-device copy bandwidth measured in the same run (bytes read + written by a
4 GiB copy), ``W`` the weights one decode step reads (bf16; every parameter except an untied input embedding,
of which a step reads N rows), ``kv`` the KV-cache bytes of one token over all layers, ``P`` the mean prompt
length and ``T`` the tokens generated: each step reads the weights once and every in-flight sequence's keys
and values (on average ``P + T/2`` tokens) and yields ``N`` tokens. ``ratio`` = total tokens/s / bound.

Random weights never stop and decode to nothing: the LM head's rows for token ids outside SmolLM2's
vocabulary, for special tokens (the stop tokens among them) and for tokens that decode to an incomplete
character are zeroed, so the greedy argmax (an in-vocabulary row has a positive logit) is always a token that
streams text, and every request runs to ``max_tokens``. Counts come from each stream's final ``usage``.

Variants (``--variants``), each a server on the same in-memory model (the directory holds the config and
tokenizer; the server's loading is patched to take that model, so weights are neither written nor read):
``before`` (ftkit's engine until this bench: a 16,384-token KV pool, 512 tokens a step, ``paged|sdpa``, no CUDA
graphs), one lever at a time (``--lever-concurrency`` waves at ``--lever-max-tokens``), ``default`` (what
``ftkit serve`` now does on a GPU, :mod:`ftkit.host.gpu_engine`: the pool from free memory, 2,048 tokens a
step, varlen flash attention, CUDA graphs, double-buffering) over ``--concurrency`` at ``--max-tokens`` as
well, and the default with one piece off. Waves with CUDA graphs follow a warm-up wave of the same shape
(graphs are captured per padded batch shape). ``direct`` times the default engine without HTTP (threads
calling ``Generator.generate``). ``check_attention`` compares the varlen kernel with SDPA per sequence first.

Run: ``python bench/serve_throughput.py --tokenizer DIR --out bench/results`` (a CUDA GPU, ~6 min for both
shapes); ``--shapes tiny --device cpu`` checks the plumbing on a CPU. Writes ``<date>-serve-<gpu>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

WORDS = ("account order refund delivery address payment invoice support ticket customer product return "
         "shipping package tracking number email password login update change cancel request help service "
         "team today tomorrow week please thank you could would should about after before again always "
         "because between during every first great little large small long short new old right wrong "
         "early late local world people time year work school house water money music story river city").split()
TINY = ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True))
BEFORE = dict(kv_cache_tokens=16384, max_batch_tokens=512, attention="sdpa", cuda_graphs=False)
VARIANTS = {  # name -> engine options (make_server keywords)
    "before": BEFORE,  # ftkit's engine until 2026-12-03
    "+ KV pool from free memory and 2048 tokens a step": dict(attention="sdpa", cuda_graphs=False),
    "+ CUDA graphs on paged|sdpa": dict(attention="sdpa", cuda_graphs=True),
    "+ varlen flash attention without CUDA graphs": dict(attention="varlen", cuda_graphs=False),
    "default": {},  # + varlen, CUDA graphs and double-buffering: what ftkit serve does on a GPU now
    "default without async batching": dict(async_batching=False),
    "default with a 1 ms GIL switch interval": dict(switch_interval=0.001),  # bench-side: sys.setswitchinterval
}


# ---- the client (its own process) ---------------------------------------------------------------
def prompt_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def one_request(port: int, body: bytes, out: dict, start: threading.Barrier) -> None:
    start.wait()
    out["t_send"] = time.perf_counter()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        out["status"] = resp.status
        if resp.status != 200:
            out["error"] = resp.read().decode()[:300]
            return
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            if line == b"data: [DONE]":
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                out["error"] = chunk["error"].get("message")
                break
            delta = chunk["choices"][0].get("delta", {})
            if delta.get("content") and "t_first" not in out:
                out["t_first"] = time.perf_counter()
            if chunk.get("usage"):
                out["tokens"] = chunk["usage"]["completion_tokens"]
                out["prompt_tokens"] = chunk["usage"]["prompt_tokens"]
        out["t_end"] = time.perf_counter()
        conn.close()
    except Exception as e:  # noqa: BLE001 - recorded, the wave goes on
        out["error"] = f"{type(e).__name__}: {e}"


def client_main(port: int, concurrency: int, max_tokens: int, words: int, seed: int) -> None:
    rng = random.Random(seed)
    bodies = [json.dumps({"messages": [{"role": "user", "content": prompt_text(rng, words)}], "stream": True,
                          "max_tokens": max_tokens, "temperature": 0}).encode() for _ in range(concurrency)]
    outs: list[dict] = [{} for _ in range(concurrency)]
    start = threading.Barrier(concurrency)
    threads = [threading.Thread(target=one_request, args=(port, b, o, start)) for b, o in zip(bodies, outs, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(outs))


def wave(port: int, concurrency: int, max_tokens: int, words: int, seed: int) -> list[dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--client", str(port), "--concurrency", str(concurrency),
           "--max-tokens", str(max_tokens), "--prompt-words", str(words), "--seed", str(seed)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def summarise(outs: list[dict], model: dict, bandwidth: float, max_tokens: int) -> dict:
    ok = [o for o in outs if o.get("status") == 200 and "error" not in o and o.get("tokens")]
    n = len(outs)
    ttft = [o["t_first"] - o["t_send"] for o in ok if "t_first" in o]
    per_req = [(o["tokens"] - 1) / (o["t_end"] - o["t_first"]) for o in ok
               if "t_first" in o and o["tokens"] > 1 and o["t_end"] > o["t_first"]]
    tokens = sum(o["tokens"] for o in ok)
    span = max(o["t_end"] for o in ok) - min(o["t_send"] for o in outs) if ok else float("nan")
    prompt = statistics.mean(o["prompt_tokens"] for o in ok) if ok else 0.0
    gen = statistics.mean(o["tokens"] for o in ok) if ok else max_tokens
    step_bytes = model["weights_bytes"] + n * model["kv_bytes_per_token"] * (prompt + gen / 2)
    bound = n * bandwidth / step_bytes
    total = tokens / span if ok else 0.0
    return {"concurrency": n, "max_tokens": max_tokens, "ok": len(ok),
            "errors": sorted({str(o.get("status")) + ": " + str(o.get("error"))[:120] for o in outs if o not in ok}),
            "mean_prompt_tokens": round(prompt, 1), "mean_reply_tokens": round(gen, 1),
            "ttft_p50_s": pct(ttft, 0.5), "ttft_p95_s": pct(ttft, 0.95),
            "decode_tps_per_request_p50": pct(per_req, 0.5), "decode_tps_per_request_min": min(per_req, default=None),
            "total_tps": total, "span_s": span, "step_bytes": step_bytes, "bound_tps": bound,
            "ratio_to_bound": total / bound}


# ---- the server side ----------------------------------------------------------------------------
def copy_bandwidth(torch, gib: int = 4, reps: int = 10) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    a = torch.empty(gib << 29, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    del a, b
    torch.cuda.empty_cache()
    return 2 * (gib << 30) * reps / seconds


def build_model(arch: str, tok, device: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch == "tiny":
        model_type, kw = TINY
    else:
        import train_throughput as tt

        model_type, kw = tt.ARCHS[arch]
    config = AutoConfig.for_model(model_type, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id, **kw)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(old)
    model = model.to(torch.bfloat16).eval()
    # never stop, always stream: zero the LM head rows of every token that would not (see the docstring)
    special = set(tok.all_special_ids)
    keep = [i for i in range(len(tok)) if i not in special and (s := tok.decode([i])) and "\ufffd" not in s]
    head = model.get_output_embeddings().weight
    mask = torch.ones(head.shape[0], dtype=torch.bool, device=head.device)
    mask[torch.tensor(keep, device=head.device)] = False
    with torch.no_grad():
        head[mask] = 0
    return model, len(keep)


def model_numbers(model, torch) -> dict:
    from ftkit.host.gpu_engine import kv_bytes_per_token

    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    emb = model.get_input_embeddings().weight
    tied = emb is model.get_output_embeddings().weight
    weights = total - (0 if tied else emb.numel() * emb.element_size())
    return {"parameters_bytes": total, "weights_bytes": weights, "tied_embeddings": tied,
            "kv_bytes_per_token": kv_bytes_per_token(model.config, model.dtype)}


class _Loader:
    """Hands the server the model already in memory instead of reading weights from the directory."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        import transformers

        self.cls = transformers.AutoModelForCausalLM
        self.orig = self.cls.__dict__["from_pretrained"]
        model = self.model
        self.cls.from_pretrained = classmethod(lambda cls, *a, **k: model)
        return self

    def __exit__(self, *exc):
        self.cls.from_pretrained = self.orig


def greedy_ids(port: int, rng_seed: int, n: int = 2, max_tokens: int = 16) -> list[list[int]]:
    rng = random.Random(rng_seed)
    ids = []
    for _ in range(n):
        body = json.dumps({"messages": [{"role": "user", "content": prompt_text(rng, 60)}], "max_tokens": max_tokens,
                           "temperature": 0, "return_token_ids": True}).encode()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        ids.append(json.loads(conn.getresponse().read())["choices"][0]["token_ids"])
        conn.close()
    return ids


def sampled_ok(port: int) -> str:
    body = json.dumps({"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16,
                       "temperature": 0.7, "top_p": 0.9}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=90)
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = json.loads(resp.read())
    return f"{resp.status}: {data.get('usage', data)}"


def direct(gen, concurrency: int, max_tokens: int, words: int, seed: int) -> dict:
    """The engine without HTTP: ``concurrency`` threads calling ``Generator.generate`` at once."""
    rng = random.Random(seed)
    prompts = [gen.encode_chat([{"role": "user", "content": prompt_text(rng, words)}]) for _ in range(concurrency)]
    counts = [0] * concurrency
    start = threading.Barrier(concurrency + 1)

    def run(i):
        start.wait()
        counts[i] = len(gen.generate(prompts[i], {}, max_tokens)[2])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    span = time.perf_counter() - t0
    return {"concurrency": concurrency, "max_tokens": max_tokens, "tokens": sum(counts), "span_s": span,
            "total_tps": sum(counts) / span}


def run_variant(name, options, model, model_dir, torch, numbers, bandwidth, waves, words, warm, result_rows,
                extra_checks=False, direct_concurrency=0):
    from ftkit.host.serve import make_server

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    options = dict(options)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(options.pop("switch_interval", interval))
    with _Loader(model):
        server = make_server(model_dir, port=0, max_tokens_cap=1024, **options)
    gen = server.RequestHandlerClass.gen
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    row = {"variant": name, "options": options, "settings": gen.settings, "start_s": time.perf_counter() - t0,
           "waves": []}
    try:
        row["greedy_ids"] = greedy_ids(port, 7)  # also the first requests: the engine's first step
        cb = gen.engine_config()
        row["engine_config"] = {k: str(getattr(cb, k, None)) for k in (
            "num_blocks", "max_batch_tokens", "use_cuda_graph", "use_async_batching", "q_padding_interval_size",
            "kv_padding_interval_size", "max_requests_per_batch", "max_blocks_per_request")}
        for i, (c, tokens) in enumerate(waves):
            if warm:
                wave(port, c, tokens, words, seed=1000 + i)
            s = summarise(wave(port, c, tokens, words, seed=i), numbers, bandwidth, tokens)
            row["waves"].append(s)
            print(f"  {name} c={c} T={tokens}: ttft p50 {s['ttft_p50_s']}, per-request {s['decode_tps_per_request_p50']}"
                  f", total {s['total_tps']:.1f} tok/s, bound {s['bound_tps']:.0f}, ratio {s['ratio_to_bound']:.3f}"
                  f", ok {s['ok']}/{c} {s['errors'][:2]}", flush=True)
            result_rows()
        if extra_checks:
            row["sampled_request"] = sampled_ok(port)
        if direct_concurrency:
            row["direct"] = direct(gen, direct_concurrency, waves[-1][1], words, seed=99)
            print(f"  {name} direct (no HTTP) c={direct_concurrency}: {row['direct']['total_tps']:.1f} tok/s", flush=True)
    except Exception as e:  # noqa: BLE001 - a variant that fails is recorded, the others still run
        row["error"] = f"{type(e).__name__}: {e}"
        print(f"  {name}: FAILED {row['error']}", flush=True)
    finally:
        if torch.cuda.is_available():
            row["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        server.shutdown()
        server.server_close()
        gen.close()
        sys.setswitchinterval(interval)
        del gen, server
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            row["memory_after_close_gb"] = torch.cuda.memory_allocated() / 1e9
    return row


def check_attention(torch) -> dict:
    """ftkit's paged varlen attention on a packed batch of sequences with cached keys (new tokens after cached
    ones, as in a decode/prefill step) against SDPA per sequence in fp32."""
    from ftkit.host.gpu_engine import paged_varlen_attention, per_sequence_attention, varlen_kernel

    g = torch.Generator(device="cuda").manual_seed(0)
    past, new = [0, 5, 100, 300, 17], [9, 1, 1, 4, 1]
    heads, kv_heads, dim = 32, 8, 128
    cu_q = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, *torch.tensor([p + n for p, n in zip(past, new, strict=True)]).cumsum(0).tolist()],
                        dtype=torch.int32, device="cuda")
    q = torch.randn(1, heads, sum(new), dim, device="cuda", generator=g).bfloat16()
    k = torch.randn(int(cu_k[-1]), kv_heads, dim, device="cuda", generator=g).bfloat16()
    v = torch.randn_like(k)

    class _Cache:
        def update(self, **kw):
            return k, v

    module = type("M", (), {"layer_idx": 0})()
    fwd = paged_varlen_attention(varlen_kernel())
    out, _ = fwd(module, q, None, None, None, cache=_Cache(), cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k,
                 max_seqlen_q=max(new), max_seqlen_k=max(p + n for p, n in zip(past, new, strict=True)),
                 scaling=dim ** -0.5, read_index=None, write_index=None)
    ref = per_sequence_attention(q.float().transpose(1, 2).squeeze(0), k.float(), v.float(), cu_q, cu_k, dim ** -0.5)
    diff = (out.float() - ref).abs().max().item()
    return {"max_abs_diff": diff, "passed": diff < 2e-2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--client", type=int, default=None, help=argparse.SUPPRESS)  # the load generator's process
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", default=None, help="a tokenizer directory (default: the embedded SmolLM2's)")
    ap.add_argument("--shapes", default="llama-3.1-8b,qwen2.5-1.5b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--prompt-words", type=int, default=180, help="words of each prompt (~1 token each)")
    ap.add_argument("--variants", default=";".join(VARIANTS), help="';'-separated")
    ap.add_argument("--lever-concurrency", default="1,64")
    ap.add_argument("--lever-max-tokens", type=int, default=64)
    ap.add_argument("--direct-concurrency", type=int, default=64)
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    if args.client is not None:
        client_main(args.client, int(args.concurrency), args.max_tokens, args.prompt_words, args.seed)
        return

    import tempfile

    import torch
    import transformers
    from transformers import AutoTokenizer

    from ftkit.core.modeling import prepare_tokenizer

    if args.tokenizer is None:
        from ftkit.core.modeling import EMBEDDED, resolve_model_path

        args.tokenizer = resolve_model_path(EMBEDDED)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    prepare_tokenizer(tok)
    cuda = args.device == "cuda"
    gpu = torch.cuda.get_device_name(0) if cuda else "cpu"
    result = {"gpu": gpu, "date": dt.date.today().isoformat(),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
              "setup": {"max_tokens": args.max_tokens, "prompt_words": args.prompt_words,
                        "lever_max_tokens": args.lever_max_tokens, "concurrency": args.concurrency}, "shapes": []}
    result["copy_bandwidth_bytes_per_s"] = bandwidth = copy_bandwidth(torch) if cuda else 50e9
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    if cuda:
        try:
            result["attention_check"] = check_attention(torch)
        except Exception as e:  # noqa: BLE001 - recorded; the default variant then shows what the engine does
            result["attention_check"] = {"passed": False, "error": f"{type(e).__name__}: {e}"}
        print(f"attention check {result['attention_check']}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{result['date']}-serve-{re.sub(r'[^a-z0-9]+', '-', gpu.lower()).strip('-')}.json"

    def save():
        path.write_text(json.dumps(result, indent=1))

    work = Path(args.work or tempfile.mkdtemp(prefix="ftkit-serve-bench-"))
    sweep = [(int(c), args.max_tokens) for c in args.concurrency.split(",")]
    levers = [(int(c), args.lever_max_tokens) for c in args.lever_concurrency.split(",")]
    for arch in args.shapes.split(","):
        model, kept = build_model(arch, tok, args.device)
        model_dir = work / f"model-{arch}"
        model.config.save_pretrained(model_dir)
        model.generation_config.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        numbers = model_numbers(model, torch)
        shape = {"shape": arch, **numbers, "streaming_tokens_kept": kept, "variants": []}
        result["shapes"].append(shape)
        print(f"{arch}: weights read per step {numbers['weights_bytes'] / 1e9:.2f} GB, KV "
              f"{numbers['kv_bytes_per_token'] / 1e3:.1f} kB/token", flush=True)
        for name in args.variants.split(";"):
            final = name == "default"
            waves = list(dict.fromkeys(levers + sweep)) if final else levers
            shape["variants"].append(run_variant(
                name, VARIANTS[name], model, model_dir, torch, numbers, bandwidth, waves, args.prompt_words,
                warm=final or VARIANTS[name].get("cuda_graphs") is True, result_rows=save, extra_checks=final,
                direct_concurrency=args.direct_concurrency if final else 0))
            save()
        before = next((v for v in shape["variants"] if v["variant"] == "before"), None)
        for v in shape["variants"]:
            if before and v.get("greedy_ids") and before.get("greedy_ids"):
                v["same_greedy_tokens_as_before"] = [_common(a, b) for a, b in zip(v["greedy_ids"], before["greedy_ids"],
                                                                                    strict=False)]
        save()
        del model
        if cuda:
            torch.cuda.empty_cache()
    print_table(result)
    print(f"wrote {path}")


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _fmt(x, d: int = 2) -> str:
    return "-" if x is None else f"{x:,.{d}f}"


def print_table(result: dict) -> None:
    print(f"\n{result['gpu']}, copy bandwidth {result['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s")
    print("| shape | variant | N | T | TTFT p50 / p95 s | decode tok/s per request | total tok/s | bound | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in result["shapes"]:
        for v in shape["variants"]:
            for w in v["waves"]:
                f = _fmt
                print(f"| {shape['shape']} | {v['variant']} | {w['concurrency']} | {w['max_tokens']} | "
                      f"{f(w['ttft_p50_s'])} / {f(w['ttft_p95_s'])} | {f(w['decode_tps_per_request_p50'], 1)} | "
                      f"{f(w['total_tps'], 1)} | {f(w['bound_tps'], 0)} | {f(w['ratio_to_bound'], 3)} |")
            if "direct" in v:
                print(f"| {shape['shape']} | {v['variant']}, no HTTP | {v['direct']['concurrency']} | "
                      f"{v['direct']['max_tokens']} | - | - | {v['direct']['total_tps']:,.1f} | | |")


if __name__ == "__main__":
    main()
