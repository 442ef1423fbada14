import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def smollm_path() -> str:
    from ftkit.core.modeling import resolve_model_path

    return resolve_model_path("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tokenizer(smollm_path):
    from ftkit.core.modeling import load_tokenizer

    return load_tokenizer(smollm_path)


@pytest.fixture(scope="session")
def tiny_path() -> str:
    from ftkit.core.modeling import resolve_model_path

    return resolve_model_path("tiny-random")


def run_make(*args, cwd=ROOT, timeout=900, env_extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    return subprocess.run(["make", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**env, **(env_extra or {})})


# Keys the smoke run finds in its environment, as a user's machine has them: the server's own key (so
# stage 05 serves with authentication), the judge's endpoint key and hub tokens. tests/test_secrets.py
# greps every file the run wrote, and make's output, for them.
PLANTED_SECRETS = {name: f"ftkit-planted-{name.lower()}-{os.urandom(6).hex()}"
                   for name in ("FTKIT_API_KEY", "OPENAI_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}


@pytest.fixture(scope="session")
def smoke_make(tmp_path_factory):
    """``make run EXP=smoke`` once per session into a temporary outputs folder, with
    :data:`PLANTED_SECRETS` in its environment: (the run's folder, make's stdout, make's stderr).
    tests/test_notebooks.py, tests/test_reports.py and tests/test_secrets.py read it."""
    out = tmp_path_factory.mktemp("outputs")
    proc = run_make("run", "EXP=smoke", f"OUTPUTS={out}", env_extra=PLANTED_SECRETS)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out / "smoke", proc.stdout, proc.stderr


@pytest.fixture(scope="session")
def smoke(smoke_make) -> Path:
    return smoke_make[0]


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable


TINY_DEMO_SIZE = 150

# the tiny model in float32 whatever the CPU (model.dtype: auto is bf16 on one with AVX512-BF16), for tests
# that check maths identities (reloads, accumulation, hand-computed losses) which bf16 rounding would blur
EXACT_MODEL = {"name": "tiny-random", "dtype": "float32"}


@pytest.fixture(scope="session")
def tiny_converted(tmp_path_factory):
    """Stages 01 and 02 once per session, as ftkit.data.run and ftkit.convert.run do them: the demo data
    (TINY_DEMO_SIZE exchanges) for the tiny random model. Tests train on copies (:func:`copy_run`)."""
    import ftkit
    from ftkit.core.config import load_config

    cfg = load_config(experiment="tiny", outputs_dir=str(tmp_path_factory.mktemp("shared")),
                      model={"name": "tiny-random"}, data={"demo_size": TINY_DEMO_SIZE})
    paths = ftkit.run_paths(cfg)
    ftkit.data.run(cfg, paths)
    ftkit.convert.run(cfg, paths)
    return paths


def copy_run(converted, outputs_dir, experiment: str):
    """A fresh experiment ``experiment`` under ``outputs_dir`` holding the shared run's stage 01-02 outputs."""
    import shutil

    from ftkit.core.paths import RunPaths

    paths = RunPaths(Path(outputs_dir), experiment)
    shutil.copytree(converted.root, paths.root, dirs_exist_ok=True)
    return paths


@pytest.fixture(scope="session")
def real_converted(tmp_path_factory):
    """Stages 01 and 02 once per session for the embedded SmolLM2-135M-Instruct on 240 demo exchanges."""
    import ftkit
    from ftkit.core.config import load_config

    cfg = load_config(experiment="real", outputs_dir=str(tmp_path_factory.mktemp("shared-real")),
                      data={"demo_size": 240})
    paths = ftkit.run_paths(cfg)
    ftkit.data.run(cfg, paths)
    ftkit.convert.run(cfg, paths)
    return paths
