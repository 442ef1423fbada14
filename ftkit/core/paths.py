"""The one place that knows where every artifact of an experiment lives.

Stages hand off only through these files, so a stage can be re-run alone and ``make`` can
tell what is up to date. No other module builds paths under ``outputs/<experiment>/``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftkit.core.files import (
    DiskFullError,
    disk_full_error,
    read_json,
    remove_partial_writes,
    sha256_file,
    write_json,
)

STAGES = ("01_data_prep", "02_format_conversion", "03_train", "04_evaluate", "05_host")
HASHED_UP_TO = 256 << 20
"""Outputs up to this size are fingerprinted by SHA-256 in a stage's done record, larger ones (model
shards) by size: hashing a 16 GB merged model at every later stage would cost minutes, and a torn
shard cannot happen (every file is written under a temporary name and renamed)."""


class StageNotDone(FileNotFoundError):
    """An earlier stage has not finished, or its outputs changed after it did: the message says what to rerun."""


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

    @property
    def raw_demo_preference(self) -> Path:
        return self.data_dir / "raw" / "acmecorp_preferences.jsonl"

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

    def done_record(self, stage: str) -> Path:
        """Written as a stage's very last act, listing its outputs' fingerprints: a stage killed or failed
        midway leaves none, so no later stage takes its half-done outputs for complete."""
        self.metrics(stage)  # the stage name is checked there
        return self.root / "done" / f"{stage}.json"

    def start(self, stage: str) -> None:
        """A stage begins: its done record goes (until :meth:`finish`), and so do the temporary files a
        killed write left behind (``.name.*.tmp``, see :func:`atomic`)."""
        self.done_record(stage).unlink(missing_ok=True)
        remove_partial_writes(self.root)

    @contextlib.contextmanager
    def stage(self, stage: str, after: str | None):
        """A stage's body: the stage it reads from must be done (:meth:`require_done`), its own done record
        goes (:meth:`start`), and a disk that fills up anywhere inside ends it with :class:`DiskFullError`
        naming the path and the space (the body calls :meth:`finish` as its last act)."""
        if after:
            self.require_done(after)
        last = self.done_record(stage)
        # what the stage wrote the last time it finished: the space a rerun needs, for the message
        needed = _output_bytes(read_json(last)) if last.is_file() else None
        self.start(stage)
        try:
            yield
        except DiskFullError:
            raise
        except Exception as e:
            full = disk_full_error(self.root, needed, e)
            if full is None:
                raise
            raise full from e

    def finish(self, stage: str, outputs, after: str | None) -> Path:
        """Record that ``stage`` ended, with ``outputs`` (files or folders that exist) fingerprinted and
        the done record of the stage it read (``after``), so a rerun of that one makes this one stale."""
        import datetime as dt

        record = {"stage": stage, "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  "after": {after: sha256_file(self.done_record(after))} if after else {},
                  "outputs": {str(Path(p).relative_to(self.root)): fingerprint(Path(p)) for p in outputs
                              if Path(p).exists()}}
        path = self.done_record(stage)
        write_json(path, record)
        return path

    def require_done(self, stage: str) -> dict[str, Any]:
        """``stage``'s done record, once its outputs and those of every stage before it are as they were
        when each finished; else :class:`StageNotDone` naming the stage to rerun."""
        record_path = self.done_record(stage)
        rerun = f"make {stage.split('_', 1)[0]} EXP={self.experiment}"
        if not record_path.is_file():
            raise StageNotDone(f"{record_path}: stage {stage} has not finished for experiment {self.experiment!r} "
                               f"(it never ran here, or was stopped or failed before its end, so its outputs may be "
                               f"partial); run it: {rerun}, or ftkit.{_MODULES[stage]}.run(cfg, paths) in its notebook")
        record = read_json(record_path)
        for after, digest in record.get("after", {}).items():
            self.require_done(after)
            if sha256_file(self.done_record(after)) != digest:
                raise StageNotDone(f"{record_path}: stage {stage} ran on outputs of {after} that were written again "
                                   f"since; rerun {stage}: {rerun}")
        for rel, expected in record.get("outputs", {}).items():
            problem = _changed(self.root / rel, expected)
            if problem:
                raise StageNotDone(f"{self.root / rel}: {problem} since stage {stage} finished; rerun it: {rerun}")
        return record

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


_MODULES = {"01_data_prep": "data", "02_format_conversion": "convert", "03_train": "train",
            "04_evaluate": "evaluate", "05_host": "host"}


def _output_bytes(record: dict) -> int:
    def size(fp: dict) -> int:
        return sum(map(size, fp["files"].values())) if "files" in fp else fp["bytes"]

    return sum(size(fp) for fp in record.get("outputs", {}).values())


def fingerprint(path: Path) -> dict[str, Any]:
    """A file's size and (up to :data:`HASHED_UP_TO`) SHA-256; a folder's files, each so."""
    if path.is_dir():
        return {"files": {str(f.relative_to(path)): fingerprint(f) for f in sorted(path.rglob("*")) if f.is_file()}}
    size = path.stat().st_size
    return {"bytes": size, "sha256": sha256_file(path) if size <= HASHED_UP_TO else None}


def _changed(path: Path, expected: dict[str, Any]) -> str | None:
    """Why ``path`` no longer matches its fingerprint, or None."""
    if not path.exists():
        return "missing"
    if "files" in expected:
        if not path.is_dir():
            return "no longer a folder"
        files = {str(f.relative_to(path)) for f in path.rglob("*") if f.is_file()}
        gone, extra = sorted(set(expected["files"]) - files), sorted(files - set(expected["files"]))
        if gone or extra:
            return f"files {'missing: ' + ', '.join(gone[:3]) if gone else 'added: ' + ', '.join(extra[:3])}"
        for rel, fp in expected["files"].items():
            problem = _changed(path / rel, fp)
            if problem:
                return f"{rel} {problem}"
        return None
    size = path.stat().st_size
    if size != expected["bytes"]:
        return f"{size:,} bytes, {expected['bytes']:,} then"
    if expected.get("sha256") and sha256_file(path) != expected["sha256"]:
        return "contents changed (SHA-256)"
    return None


def resolve_outputs_dir(outputs_dir: str | Path) -> Path:
    """A relative outputs_dir is taken from the project root (the folder holding notebooks/ and
    parameters/), so a notebook run from notebooks/ in JupyterLab writes where `make` does."""
    from ftkit.core.session import project_root

    p = Path(outputs_dir)
    return p if p.is_absolute() else project_root() / p
