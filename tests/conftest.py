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


def run_make(*args, cwd=ROOT, timeout=900):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    return subprocess.run(["make", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable
