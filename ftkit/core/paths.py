"""The one place that knows where every artifact of an experiment lives.

Stages hand off only through these files, so a stage can be re-run alone and ``make`` can
tell what is up to date. No other module builds paths under ``outputs/<experiment>/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STAGES = ("01_data_prep", "02_format_conversion", "03_train", "04_evaluate", "05_host")


@dataclass(frozen=True)
class RunPaths:
    """Artifact paths of one experiment: ``RunPaths("outputs", "demo").train_split``."""

    outputs_dir: str | Path
    experiment: str

    @property
    def root(self) -> Path:
        return Path(self.outputs_dir) / self.experiment

    # stage 01
    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def split(self, name: str) -> Path:
        """Cleaned conversations of one split (`train`, `val`, `test`) as JSONL."""
        return self.data_dir / f"{name}.jsonl"

    @property
    def quarantine(self) -> Path:
        """Records that were not kept, each with the reason."""
        return self.data_dir / "quarantine.jsonl"

    @property
    def raw_demo(self) -> Path:
        return self.data_dir / "raw" / "acmecorp_support.csv"

    # stage 02
    @property
    def formatted_dir(self) -> Path:
        return self.root / "formatted"

    def chat(self, name: str) -> Path:
        """Chat `messages` records of one split (OpenAI fine-tuning JSONL shape)."""
        return self.formatted_dir / f"{name}.chat.jsonl"

    def openai_export(self, name: str) -> Path:
        """The split as OpenAI fine-tuning JSONL (only `messages`), for use with other tools."""
        return self.formatted_dir / f"{name}.openai.jsonl"

    @property
    def tokenizer_dir(self) -> Path:
        """The tokenizer and chat template every later stage uses (train = serve)."""
        return self.root / "tokenizer"

    @property
    def format_quarantine(self) -> Path:
        """Records stage 02 could not use (invalid messages, over the length limit), with reasons."""
        return self.formatted_dir / "quarantine.jsonl"

    def tokens(self, name: str) -> Path:
        """Tokenised split: input_ids and labels (-100 where not trained)."""
        return self.formatted_dir / f"{name}.tokens.jsonl"

    # stage 03
    @property
    def adapter_dir(self) -> Path:
        return self.root / "adapter"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def stop_request(self) -> Path:
        """Created (`touch`) to stop training cleanly at the next step, like a kernel interrupt in a notebook."""
        return self.root / "STOP"

    @property
    def train_log(self) -> Path:
        return self.root / "logs" / "train_log.json"

    # stage 04
    @property
    def generations(self) -> Path:
        return self.root / "eval" / "generations.jsonl"

    # stage 05
    @property
    def merged_dir(self) -> Path:
        return self.root / "merged"

    @property
    def server_log(self) -> Path:
        return self.root / "logs" / "server.log"

    @property
    def exports_dir(self) -> Path:
        """GGUF files and the Ollama Modelfile."""
        return self.root / "exports"

    def gguf(self, qtype: str) -> Path:
        """The merged model as GGUF (`f16`, `q8_0`) for llama.cpp and Ollama."""
        return self.exports_dir / f"{self.experiment}-{qtype}.gguf"

    @property
    def modelfile(self) -> Path:
        return self.exports_dir / "Modelfile"

    # every stage
    def metrics(self, stage: str) -> Path:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
        return self.root / "metrics" / f"{stage}.json"

    @property
    def work_dir(self) -> Path:
        """Stage 01's spool of rows and conversations (removed when the stage ends)."""
        return self.data_dir / ".work"

    @property
    def replay_cache(self) -> Path:
        """The base model's own answers to the general prompts (the forgetting guard's self-distillation)."""
        return self.data_dir / "replay.jsonl"

    @property
    def launch_config(self) -> Path:
        """The accelerate config stage 03 wrote for ``accelerate launch``."""
        return self.root / "logs" / "train_config.yaml"

    def rank_log(self, rank: int) -> Path:
        """What each rank of a several-process run ended with (checked for agreement)."""
        return self.root / "logs" / f"rank{rank}.json"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def config_record(self) -> Path:
        """The resolved config the run used, written by stage 01 (``ftkit compare`` reads it)."""
        return self.root / "config.json"

    def write_metrics(self, stage: str, metrics: dict[str, Any]) -> Path:
        path = self.metrics(stage)
        write_json(path, metrics)
        return path

    def read_metrics(self, stage: str) -> dict[str, Any]:
        return read_json(self.metrics(stage), produced_by=stage)

    def require(self, path: Path, produced_by: str) -> Path:
        """Fail with a clear message when an upstream stage's output is missing."""
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist: it is written by {produced_by}. Run that stage first "
                f"(make {produced_by.split('_', 1)[0]} EXP={self.experiment}) or check `experiment`."
            )
        return path


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename), so readers never see half a file."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_jsonable) + "\n")


def read_json(path: Path, produced_by: str | None = None) -> Any:
    if not path.exists() and produced_by:
        raise FileNotFoundError(f"{path} does not exist: it is written by stage {produced_by}; run it first.")
    return json.loads(path.read_text(encoding="utf-8"))


@contextlib.contextmanager
def atomic(path: Path, directory: bool = False):
    """Write ``path`` (a file, or a directory with ``directory``) under a temporary name beside it, renamed
    into place only when the block finishes: a crash or a full disk never leaves half a file where a
    later stage, a rerun or a server would take it for complete. An existing directory is replaced."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    else:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if directory and path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    with atomic(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_jsonl(path: Path, rows) -> int:
    """Write an iterable of dicts as JSONL atomically; returns the row count."""
    n = 0
    with atomic(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=_jsonable) + "\n")
            n += 1
    return n


def iter_jsonl(path: Path):
    """The records of a JSONL file, one at a time (blank lines skipped); a bad line names file:line and the fix."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg}); fix or remove that line") from None


def read_jsonl(path: Path) -> list[dict]:
    return list(iter_jsonl(path))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def resolve_outputs_dir(outputs_dir: str | Path) -> Path:
    """A relative outputs_dir is taken from the project root (the folder holding notebooks/ and
    parameters/), so a notebook run from notebooks/ in JupyterLab writes where `make` does."""
    from ftkit.core.session import project_root

    p = Path(outputs_dir)
    return p if p.is_absolute() else project_root() / p
