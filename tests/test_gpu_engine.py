"""The serving engine's GPU settings (ftkit/host/gpu_engine.py), checked on a CPU: the KV pool arithmetic, the
optional engine fields, and the paged varlen attention's bookkeeping through transformers' continuous batching
(its CPU path, SDPA per sequence, must give the tokens paged|sdpa gives; the flash kernel itself is checked on
the GPU by bench/serve_throughput.py)."""

import pytest
import torch


def _llama(**kw):
    from transformers import LlamaConfig

    base = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256)
    return LlamaConfig(**{**base, **kw})


def test_kv_pool_from_free_memory():
    from ftkit.host.gpu_engine import KV_POOL_MAX_TOKENS, auto_kv_cache_tokens, kv_bytes_per_token

    cfg = _llama()
    assert kv_bytes_per_token(cfg, torch.bfloat16) == 2 * 32 * 8 * 128 * 2  # 128 KiB a token
    assert auto_kv_cache_tokens(cfg, torch.bfloat16, 10 * 2**30, 256) == 24_576  # 30% of 10 GiB, whole blocks
    assert auto_kv_cache_tokens(cfg, torch.bfloat16, 10**15, 256) == KV_POOL_MAX_TOKENS
    assert auto_kv_cache_tokens(cfg, torch.bfloat16, 1, 256) == 256  # never less than one block


def test_sliding_layers_keep_sdpa():
    from transformers import MistralConfig, Qwen2Config

    from ftkit.host.gpu_engine import has_sliding_layers

    assert not has_sliding_layers(_llama())
    assert not has_sliding_layers(Qwen2Config(use_sliding_window=False))
    assert has_sliding_layers(MistralConfig(sliding_window=4096))


def test_extra_engine_fields_only_where_the_version_has_them():
    import dataclasses

    from ftkit.host.engine import engine_config_kwargs

    cls = dataclasses.make_dataclass("CB", [(n, object, None) for n in (
        "block_size", "num_blocks", "max_batch_tokens", "max_blocks_per_request", "use_cuda_graph")])
    kw = engine_config_kwargs(cls, kv_cache_tokens=512, max_batch_tokens=64, per_request_processors=False,
                              extra={"use_cuda_graph": True, "kv_padding_interval_size": 2048})
    assert kw == {"block_size": 256, "num_blocks": 2, "max_batch_tokens": 64, "max_blocks_per_request": 0,
                  "use_cuda_graph": True}


def test_per_sequence_attention_aligns_queries_to_the_end_of_their_keys():
    """Two packed sequences with cached keys (3 new queries after 4 cached keys; 1 after 6), grouped-query heads:
    each output row is softmax attention over its own sequence's keys up to its own position."""
    from ftkit.host.gpu_engine import paged_varlen_attention

    torch.manual_seed(0)
    cu_q, cu_k = torch.tensor([0, 3, 4]), torch.tensor([0, 7, 14])
    q, k, v = torch.randn(4, 4, 8), torch.randn(14, 2, 8), torch.randn(14, 2, 8)

    class Cache:
        def update(self, **kw):
            return k, v

    fwd = paged_varlen_attention(None)
    out, _ = fwd(type("M", (), {"layer_idx": 0})(), q.transpose(0, 1).unsqueeze(0), None, None, None, cache=Cache(),
                 cu_seq_lens_q=cu_q, cu_seq_lens_k={"full_attention": cu_k}, max_seqlen_q=3,
                 max_seqlen_k={"full_attention": 7}, scaling=0.5, read_index=None, write_index=None)
    for row, (seq, last_key) in enumerate([(0, 4), (0, 5), (0, 6), (1, 13)]):
        keys = range(int(cu_k[seq]), last_key + 1)
        for h in range(4):
            w = torch.softmax(torch.stack([q[row, h] @ k[j, h // 2] * 0.5 for j in keys]), 0)
            want = sum(wi * v[j, h // 2] for wi, j in zip(w, keys, strict=True))
            assert torch.allclose(out[row, h], want, atol=1e-5), (row, h)


def test_paged_varlen_gives_the_tokens_of_paged_sdpa():
    """Prompts of different lengths, prefilled in chunks of 16 tokens (so queries come after cached keys),
    decoded together: the same greedy tokens through ftkit's attention as through transformers' paged|sdpa."""
    from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig

    from ftkit.host.engine import engine_config_kwargs
    from ftkit.host.gpu_engine import PAGED_VARLEN, register_paged_varlen

    if not register_paged_varlen():
        pytest.skip("this PyTorch has no torch.nn.attention.varlen")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_llama(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=256),
                                             attn_implementation="sdpa").eval()
    prompts = [torch.randint(3, 256, (n,)).tolist() for n in (5, 23, 40)]
    gc = GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=-1, pad_token_id=0)
    outs = {}
    try:
        model.set_attn_implementation(PAGED_VARLEN)
    except ValueError:
        pytest.skip("this transformers' continuous batching takes no registered paged| attention (5.24 and later)")
    if model.config._attn_implementation != PAGED_VARLEN:  # 5.24 drops the prefix where the bare name is registered
        pytest.skip("this transformers' continuous batching takes no registered paged| attention (5.24 and later)")
    for impl in ("sdpa", PAGED_VARLEN):
        model.set_attn_implementation(impl)
        cb = ContinuousBatchingConfig(**engine_config_kwargs(ContinuousBatchingConfig, kv_cache_tokens=1024,
                                                             max_batch_tokens=16, per_request_processors=False,
                                                             page_tokens=32))
        res = model.generate_batch(prompts, generation_config=gc, continuous_batching_config=cb, progress_bar=False)
        outs[impl] = sorted(tuple(r.prompt_ids) + tuple(r.generated_tokens) for r in res.values())
    assert outs[PAGED_VARLEN] == outs["sdpa"]
    assert all(len(o) == len(p) + 12 for o, p in zip(outs[PAGED_VARLEN], sorted(map(tuple, prompts)), strict=True))


def test_gpu_setup_chooses_attention_graphs_and_double_buffering_together():
    """fp32 weights keep transformers' SDPA without graphs; bf16 takes the varlen attention with CUDA graphs and
    double-buffering where this transformers accepts it (else SDPA, and neither); 'varlen' asked for where it
    cannot run is an error, not a silent fallback. (The pool is given: sizing it from free memory needs CUDA.)"""
    from transformers import AutoModelForCausalLM

    from ftkit.host.gpu_engine import KV_PADDING_TOKENS, PAGED_VARLEN, gpu_setup

    small = _llama(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=256)
    model = AutoModelForCausalLM.from_config(small, attn_implementation="sdpa").eval()
    kw = dict(kv_cache_tokens=1024, max_batch_tokens=None, cuda_graphs=None, page_tokens=256)
    plan = gpu_setup(model, attention="auto", **kw)
    assert plan == {"kv_cache_tokens": 1024, "max_batch_tokens": 2048, "attention": "sdpa",
                    "extra": {"use_cuda_graph": False, "use_async_batching": False}}
    with pytest.raises(ValueError, match="not available"):
        gpu_setup(model, attention="varlen", **kw)
    plan = gpu_setup(model.to(torch.bfloat16), attention="auto", **kw)
    if plan["attention"] == PAGED_VARLEN:
        assert plan["extra"] == {"use_cuda_graph": True, "kv_padding_interval_size": KV_PADDING_TOKENS,
                                 "use_async_batching": True}
    else:
        assert plan["extra"] == {"use_cuda_graph": False, "use_async_batching": False}
    assert gpu_setup(model, attention="sdpa", **kw)["attention"] == "sdpa"
    # a process that trained first has training's packed attention registered under the bare name: the
    # engine must still end on a paged attention its continuous batching takes, never on training's
    from ftkit.train.kernels import register_varlen_attention

    register_varlen_attention()
    assert gpu_setup(model, attention="auto", **kw)["attention"] in ("sdpa", PAGED_VARLEN)
    assert model.config._attn_implementation in ("sdpa", PAGED_VARLEN)
    assert model.config._attn_implementation == "sdpa"
