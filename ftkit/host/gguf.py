"""GGUF export for llama.cpp and Ollama, written by llama.cpp's own converter and checked on the way out.

The merged directory goes through ``convert_hf_to_gguf.py`` (:mod:`ftkit.host.llama_cpp`), which knows
every architecture llama.cpp runs; Q4_K_M comes from llama.cpp's quantiser when llama-cpp-python is
built. Every file is then checked against the merged model on held-out prompts:

* read back with transformers' GGUF loader (``gguf_file=``) where transformers knows the
  architecture: logits compared (relative difference, greedy agreement, KL divergence), the GGUF's
  tokenizer must give the same ids and carry the same chat template;
* loaded in llama.cpp itself (llama-cpp-python) where it is installed: the same comparison on
  llama.cpp's logits, and a greedy generation compared token by token with the merged model's.

A file that cannot be written (an architecture the converter refuses, tools not fetched) is
skipped with the reason, never fails the stage; an explicit type that fails its check is marked.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from ftkit.core.files import atomic
from ftkit.host import llama_cpp

log = logging.getLogger("ftkit")

# Round-trip tolerances: (max |Δlogit| relative to the merged model's largest |logit|, least share of
# positions with the same greedy next token, largest mean KL divergence merged → GGUF per position).
# Near-ties can flip the greedy token, so agreement is bounded loosely and the KL divergence
# (llama.cpp's measure of quantisation loss) carries the distribution-level check.
TOLERANCE = {"f32": (1e-4, 0.99, 1e-5), "f16": (1e-2, 0.95, 1e-3), "bf16": (3e-2, 0.95, 5e-3),
             "q8_0": (5e-2, 0.95, 1e-2), "q4_k_m": (0.5, 0.75, 0.15)}
# llama.cpp also quantises the activations of Q8_0 dot products to 8 bits, so its own run of a file is
# looser than transformers' de-quantised read of the same file: on the demo's merged SmolLM2-135M (8 prompts,
# 492 positions) 6.9% / 92.1% / KL 0.0115 against transformers' 4.4% / 95.5% / 0.0036, with 97.4% of the
# greedy generation the same.
LLAMA_CPP_TOLERANCE = {**TOLERANCE, "q8_0": (0.1, 0.90, 0.02)}
_CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
GENERATE_TOKENS = 24


class GGUFExportError(ValueError):
    """The model cannot be exported (the reason says why and what to do)."""


def auto_types() -> list[str]:
    """``host.gguf_types: auto``: Q8_0, plus Q4_K_M where llama.cpp's quantiser is installed."""
    return ["q8_0"] + (["q4_k_m"] if llama_cpp.bindings() else [])


def write_gguf(model_dir: str | Path, out: str | Path, qtype: str = "q8_0") -> dict:
    """Write ``model_dir`` (a merged Hugging Face model) as one GGUF file of ``qtype``, atomically."""
    model_dir, out = Path(model_dir), Path(out)
    try:
        with atomic(out) as tmp:
            if qtype in _CONVERTER_TYPES:
                llama_cpp.convert(model_dir, tmp, qtype)
            else:
                if llama_cpp.bindings() is None:
                    raise llama_cpp.ToolError(f"{qtype} needs llama.cpp's quantiser; run: {llama_cpp.FETCH_HINT}")
                f16 = out.with_name(f".{out.name}.f16.tmp")  # scratch: the quantiser's input, never kept
                try:
                    llama_cpp.convert(model_dir, f16, "f16")
                    llama_cpp.quantize(f16, tmp, qtype)
                finally:
                    f16.unlink(missing_ok=True)
    except llama_cpp.ToolError as e:
        raise GGUFExportError(str(e)) from None
    return {"path": str(out), "type": qtype, "bytes": out.stat().st_size}


def _merged_logits(model_dir, prompts, greedy: bool = True):
    """The merged model's logits for ``prompts`` and, when ``greedy`` (only llama.cpp's check compares
    generations), its greedy continuations: on the demo's 2 CPU cores 8-11 s of the call, against ~1 s for the logits."""
    from transformers import AutoModelForCausalLM

    from ftkit.core.masking import render
    from ftkit.core.modeling import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True).eval()
    texts = [render(tok, p, add_generation_prompt=True) for p in prompts]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    with torch.no_grad():
        logits = [ref(input_ids=torch.tensor([x])).logits[0] for x in ids]
        continuations = [ref.generate(torch.tensor([x]), max_new_tokens=GENERATE_TOKENS, do_sample=False,
                                      attention_mask=torch.ones(1, len(x), dtype=torch.long))[0, len(x):].tolist()
                         for x in ids] if greedy else None
    return tok, texts, ids, logits, continuations


def _compare(ref_logits, got_logits, qtype: str, tolerance: dict = TOLERANCE) -> dict:
    diff = scale = kl = 0.0
    agree = total = 0
    for a, b in zip(ref_logits, got_logits, strict=True):
        diff = max(diff, (a - b).abs().max().item())
        scale = max(scale, a.abs().max().item())
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        la, lb = a.log_softmax(-1), b.log_softmax(-1)
        kl += (la.exp() * (la - lb)).sum(-1).sum().item()
        total += a.shape[0]
    max_rel, min_top1, max_kl = tolerance[qtype]
    rel, top1, mkl = diff / scale, agree / total, kl / total
    return {"positions": total, "max_abs_logit_diff": diff, "relative_logit_diff": rel, "relative_tolerance": max_rel,
            "top1_agreement": top1, "min_top1_agreement": min_top1, "mean_kl_divergence": mkl,
            "max_mean_kl_divergence": max_kl, "logits_passed": rel <= max_rel and top1 >= min_top1 and mkl <= max_kl}


@contextlib.contextmanager
def _no_tensor_bar():
    """transformers' GGUF reader draws a tqdm bar per file with tqdm itself (no setting of transformers
    turns it off): in a notebook it is a widget that would sit in the mailed report."""
    import transformers.modeling_gguf_pytorch_utils as reader

    bar = getattr(reader, "tqdm", None)
    reader.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        if bar is not None:
            reader.tqdm = bar


@torch.no_grad()
def verify_transformers(tok, texts, ids, ref_logits, gguf_file: Path, qtype: str) -> dict:
    """Read the file back with transformers' GGUF loader (de-quantised) and compare."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _no_tensor_bar():
            back = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                        dtype=torch.float32).eval()
            gtok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    except Exception as e:  # an architecture or quantisation transformers' reader does not know
        return {"checked": False, "reason": f"transformers cannot read it: {type(e).__name__}: {str(e)[:200]}"}
    got = [back(input_ids=torch.tensor([x])).logits[0] for x in ids]
    out = _compare(ref_logits, got, qtype)
    same_ids = all(gtok(t, add_special_tokens=False)["input_ids"] == x for t, x in zip(texts, ids, strict=True))
    out.update(checked=True, tokenizer_matches=same_ids, chat_template_matches=gtok.chat_template == tok.chat_template)
    out["passed"] = out["logits_passed"] and same_ids and out["chat_template_matches"]
    return out


def verify_llama_cpp(ids, ref_logits, greedy, gguf_file: Path, qtype: str) -> dict:
    """Load the file in llama.cpp (llama-cpp-python): its logits and a greedy generation compared."""
    mod = llama_cpp.bindings()
    if mod is None:
        return {"checked": False, "reason": f"llama-cpp-python is not installed; run: {llama_cpp.FETCH_HINT}"}
    import numpy as np

    llm = mod.Llama(model_path=str(gguf_file), n_ctx=max(len(x) for x in ids) + GENERATE_TOKENS + 8,
                    logits_all=True, verbose=False, n_threads=max(1, (torch.get_num_threads() or 1)))
    got, same, total = [], 0, 0
    for x, want in zip(ids, greedy, strict=True):
        llm.reset()
        llm.eval(x)
        got.append(torch.from_numpy(np.array(llm.scores[: len(x)], dtype=np.float32)))
        gen = []
        for t in llm.generate(x, temp=0.0, top_k=1, reset=True):
            gen.append(t)
            if len(gen) >= len(want) or t == llm.token_eos():
                break
        n = min(len(gen), len(want))
        same += sum(1 for a, b in zip(gen[:n], want[:n], strict=True) if a == b)
        total += len(want)
    out = _compare(ref_logits, got, qtype, LLAMA_CPP_TOLERANCE)
    out.update(checked=True, generated_tokens=total, generation_agreement=same / max(total, 1))
    out["passed"] = out["logits_passed"]
    return out


def export_all(merged_dir: str | Path, paths, qtypes, prompts: list[list[dict]],
               system_prompt: str | None = None) -> dict:
    """Each GGUF type written and checked (skipped with a reason where it cannot be), plus the
    Ollama Modelfile for the smallest file that passed."""
    from ftkit.core.files import atomic_write_text
    from ftkit.core.modeling import load_tokenizer

    auto = qtypes == "auto"
    qtypes = auto_types() if auto else list(qtypes)
    out: dict = {"gguf": [], "gguf_skipped": [], "gguf_passed": None}
    if not qtypes:
        out["gguf_note"] = "no GGUF export: host.gguf_types is empty"
        return out
    ref = None
    for q in qtypes:
        try:
            written = write_gguf(merged_dir, paths.gguf(q), q)
        except GGUFExportError as e:
            log.warning("GGUF %s skipped: %s", q, e)
            out["gguf_skipped"].append({"type": q, "reason": str(e)})
            continue
        log.info("wrote %s (%s MB); checking it against %s", written["path"], f"{written['bytes'] / 1e6:,.0f}", merged_dir)
        ref = ref or _merged_logits(merged_dir, prompts, greedy=llama_cpp.bindings() is not None)
        tok, texts, ids, logits, continuations = ref
        hf = verify_transformers(tok, texts, ids, logits, Path(written["path"]), q)
        cpp = verify_llama_cpp(ids, logits, continuations, Path(written["path"]), q)
        checks = [c for c in (hf, cpp) if c["checked"]]
        written.update(transformers=hf, llama_cpp=cpp, checked_by=[n for n, c in (("transformers", hf),
                                                                                 ("llama.cpp", cpp)) if c["checked"]],
                       passed=bool(checks) and all(c["passed"] for c in checks))
        out["gguf"].append(written)
    if out["gguf"]:
        out["gguf_passed"] = all(r["passed"] for r in out["gguf"])
    elif not auto:
        out["gguf_passed"] = False
    if out["gguf_skipped"] and not out["gguf"]:
        out["gguf_note"] = "no GGUF written: " + "; ".join(f"{s['type']}: {s['reason']}" for s in out["gguf_skipped"])
    good = [r for r in out["gguf"] if r["passed"]]
    if good:
        smallest = min(good, key=lambda r: r["bytes"])
        try:
            text = modelfile(load_tokenizer(str(merged_dir)), Path(smallest["path"]).name, system_prompt)
        except GGUFExportError as e:
            out["modelfile_note"] = str(e)
        else:
            atomic_write_text(paths.modelfile, text)
            out["modelfile"] = str(paths.modelfile)
    return out


# -- Ollama ------------------------------------------------------------------------------------

_MSG = "FTKITMESSAGE"


def go_template(tokenizer) -> str:
    """The chat template as an Ollama Go template, derived from the Jinja one and checked.

    Each role's wrapper (the text around a message's content) and the generation prompt are read
    off renders of probe conversations; the Go template rebuilt from them must reproduce the Jinja
    template's output on multi-turn probes with and without a system message, or the template is
    refused (one that rewrites earlier turns or folds the system message cannot be written this way).
    BOS is left out: llama.cpp adds it as the GGUF's ``tokenizer.ggml.add_bos_token`` says.
    """
    from ftkit.core.masking import render

    # only a BOS the template writes itself (``{{ bos_token }}``) is left to llama.cpp; SmolLM2's BOS is
    # <|im_start|>, which its template writes as a marker
    bos = (tokenizer.bos_token or "") if "bos_token" in (tokenizer.chat_template or "") else ""

    def r(msgs, gen=False):
        text = render(tokenizer, msgs, add_generation_prompt=gen)
        return text[len(bos):] if bos and text.startswith(bos) else text

    def wrap(before: str, after: str) -> tuple[str, str]:
        if not after.startswith(before) or _MSG not in after[len(before):]:
            raise GGUFExportError("no Ollama TEMPLATE: the chat template does not render a conversation as a growing "
                                  "prefix; write the Go template by hand")
        pre, post = after[len(before):].split(_MSG, 1)
        return pre, post

    def msg(role, content):
        return {"role": role, "content": content}

    one = r([msg("user", "x")])
    u_pre, u_post = wrap(r([msg("user", "x"), msg("assistant", "y")]),
                         r([msg("user", "x"), msg("assistant", "y"), msg("user", _MSG)]))
    a_pre, a_post = wrap(one, r([msg("user", "x"), msg("assistant", _MSG)]))
    gen = r([msg("user", "x")], True)[len(one):]
    user_x = u_pre + "x" + u_post
    try:
        with_sys = r([msg("system", _MSG), msg("user", "x")])
    except Exception:
        with_sys = ""
    if not (one.endswith(user_x) and with_sys.endswith(user_x) and _MSG in with_sys):
        raise GGUFExportError("no Ollama TEMPLATE: the chat template treats the first turn or a system message in a "
                              "way a per-message Go template cannot express (it folds or moves it); write it by hand")
    head = one[: len(one) - len(user_x)]
    s_pre, s_post = with_sys[: len(with_sys) - len(user_x)].split(_MSG, 1)
    # the head a template writes when the conversation has no system message (SmolLM2's default system)
    sys_head = ("{{ if or (not .Messages) (ne (index .Messages 0).Role \"system\") }}" + head + "{{ end }}") if head else ""
    go = (sys_head + "{{ range .Messages }}{{ if eq .Role \"system\" }}" + s_pre + "{{ .Content }}" + s_post
          + "{{ else if eq .Role \"user\" }}" + u_pre + "{{ .Content }}" + u_post
          + "{{ else }}" + a_pre + "{{ .Content }}" + a_post + "{{ end }}{{ end }}" + gen)

    def emulate(msgs):
        out = "" if msgs and msgs[0]["role"] == "system" else head
        for m in msgs:
            pre, post = {"system": (s_pre, s_post), "user": (u_pre, u_post)}.get(m["role"], (a_pre, a_post))
            out += pre + m["content"] + post
        return out + gen

    for probe in ([{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
                   {"role": "user", "content": "u2"}],
                  [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
                   {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}]):
        if emulate(probe) != r(probe, True):
            raise GGUFExportError("no Ollama TEMPLATE: the chat template renders multi-turn conversations differently "
                                  f"from its per-message layout (rendered {r(probe, True)[:160]!r}); write it by hand")
    return go


def modelfile(tokenizer, gguf_name: str, system_prompt: str | None = None) -> str:
    """An Ollama Modelfile: the GGUF, the chat template as a Go template (:func:`go_template`), the
    training system prompt as ``SYSTEM`` and the stop tokens."""
    from ftkit.core.modeling import stop_token_ids

    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{go_template(tokenizer)}"""']
    if system_prompt:
        lines.append(f'SYSTEM """{system_prompt}"""')
    lines += [f'PARAMETER stop "{tokenizer.convert_ids_to_tokens(t)}"' for t in stop_token_ids(tokenizer)]
    return "\n".join(lines) + "\n"
