"""llama.cpp's own tools, taken from the ``llama-cpp-python`` source distribution on PyPI.

That archive (pinned below, SHA-256 checked) carries llama.cpp's ``convert_hf_to_gguf.py`` with
its matching ``gguf-py``, the model authors' chat templates (``models/templates/*.jinja``) and
the sources to build llama.cpp itself. ``ftkit export-tools`` (``make export-tools``) fetches it
once into ``$FTKIT_CACHE/llama.cpp/<version>/``; ``--build`` also builds llama-cpp-python into a
cached wheel and installs it, which brings llama.cpp's quantiser (Q4_K_M) and a loader to check
every exported file by generating with it. ``$FTKIT_LLAMA_CPP`` may instead name a llama.cpp
checkout of your own.

The converter runs as a subprocess with its own ``gguf-py`` first on the path, so it never mixes
with the ``gguf`` package installed next to ftkit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ftkit.core.files import sha256_file

PACKAGE, VERSION = "llama-cpp-python", "0.3.36"
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
_PREFIX = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/templates/", "LICENSE")
FETCH_HINT = "make export-tools  (or: ftkit export-tools --build)"


class ToolError(RuntimeError):
    """llama.cpp's tools are missing or failed; the message says what to run."""


def home() -> Path:
    """Where the tools lie: ``$FTKIT_LLAMA_CPP`` or the cache."""
    if os.environ.get("FTKIT_LLAMA_CPP"):
        return Path(os.environ["FTKIT_LLAMA_CPP"]).expanduser()
    from ftkit.core.modeling import cache_dir

    return cache_dir() / "llama.cpp" / VERSION


def archive() -> Path:
    return home().parent / f"llama_cpp_python-{VERSION}.tar.gz"


def available() -> bool:
    return (home() / "convert_hf_to_gguf.py").exists()


def fetch(quiet: bool = True) -> Path:
    """Download the source archive once, check its hash and unpack the converter, ``gguf-py`` and
    the templates (nothing is built or run); returns :func:`home`."""
    if available():
        return home()
    target = home()
    target.parent.mkdir(parents=True, exist_ok=True)
    if not archive().exists():
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", tmp,
                   f"{PACKAGE}=={VERSION}"] + (["-q"] if quiet else [])
            if subprocess.run(cmd).returncode:
                raise ToolError(f"could not download {PACKAGE}=={VERSION} from the package index (pip's error above); "
                                "retry with the index reachable")
            got = next(Path(tmp).glob("*.tar.gz"))
            digest = sha256_file(got)
            if digest != SHA256:
                raise ToolError(f"{got.name} has SHA-256 {digest}, expected {SHA256}: not the archive ftkit pins")
            os.replace(got, archive())
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{VERSION}."))
    try:
        with tarfile.open(archive()) as tf:
            for m in tf.getmembers():
                rel = m.name[len(_PREFIX):] if m.name.startswith(_PREFIX) else None
                if rel and m.isfile() and rel.startswith(_MEMBERS):
                    dest = staging / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(tf.extractfile(m).read())
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def templates() -> list[Path]:
    """The model authors' chat templates that llama.cpp collects (empty until fetched)."""
    return sorted((home() / "models" / "templates").glob("*.jinja"))


def build_wheel() -> Path:
    """Build llama-cpp-python from the pinned archive into a cached wheel (once) and install it."""
    fetch()
    wheels = home().parent / "wheels"
    found = sorted(wheels.glob(f"llama_cpp_python-{VERSION}-*.whl"))
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        if subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheels), str(archive())]).returncode:
            raise ToolError(f"building {PACKAGE} failed (pip's output above): it needs a C/C++ compiler and cmake")
        found = sorted(wheels.glob(f"llama_cpp_python-{VERSION}-*.whl"))
    # its own dependencies (numpy, jinja2, diskcache, typing-extensions) are ftkit's already, bar diskcache
    if subprocess.run([sys.executable, "-m", "pip", "install", "-q", str(found[-1]), "diskcache>=5.6"]).returncode:
        raise ToolError(f"installing {found[-1].name} failed (pip's output above)")
    return found[-1]


def bindings():
    """The ``llama_cpp`` module when llama-cpp-python is installed, else None."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp


def convert(model_dir: str | Path, out: str | Path, outtype: str) -> None:
    """llama.cpp's ``convert_hf_to_gguf.py`` on ``model_dir``; raises :class:`ToolError` with the
    converter's own last words (e.g. an architecture it does not know)."""
    if not available():
        raise ToolError(f"llama.cpp's converter is not fetched; run: {FETCH_HINT}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(home() / "gguf-py"), os.environ.get("PYTHONPATH", "")]),
           "NO_LOCAL_GGUF": ""}
    cmd = [sys.executable, str(home() / "convert_hf_to_gguf.py"), str(model_dir), "--outfile", str(out),
           "--outtype", outtype]
    from ftkit.core.progress import timed

    # the converter's output is kept for the error message: a line when it starts, ends, and while it runs
    with timed(f"05_host: GGUF {outtype} by llama.cpp's converter"):
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode:
            lines = [ln for ln in (res.stderr + res.stdout).splitlines() if ln.strip()]
            last = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "")
            raise ToolError(f"llama.cpp's converter failed on {model_dir}: {last.strip()}")


def quantize(src: str | Path, dst: str | Path, qtype: str) -> None:
    """llama.cpp's own quantiser (through llama-cpp-python) from a 16/32-bit GGUF."""
    llama_cpp = bindings()
    if llama_cpp is None:
        raise ToolError(f"{qtype} needs llama.cpp's quantiser (llama-cpp-python is not installed); run: {FETCH_HINT}")
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise ToolError(f"llama.cpp could not quantise {src} to {qtype}")
