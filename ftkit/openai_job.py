"""``ftkit import-openai-job``: an OpenAI fine-tuning job as an ftkit parameters file.

Reads the job object (``client.fine_tuning.jobs.retrieve(...)`` as JSON) or the body sent to
``client.fine_tuning.jobs.create``: ``model``, ``training_file``, ``validation_file``, ``suffix``,
``seed`` and the hyperparameters (``n_epochs``, ``batch_size``, ``learning_rate_multiplier``), under
``method.supervised.hyperparameters`` (DPO jobs: ``method.dpo.hyperparameters``, ``beta`` included) or the
older top-level ``hyperparameters``. Writes a YAML file
with a comment on each choice: what was mapped and how, what "auto" leaves at ftkit's default, and
every field that was not used, so nothing is dropped without a word.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import yaml

from ftkit.core.config import TrainConfig

# the job object's own bookkeeping: no setting of the run to carry over
BOOKKEEPING = {"object", "id", "created_at", "finished_at", "fine_tuned_model", "organization_id", "result_files",
               "status", "trained_tokens", "estimated_finish", "error", "user_provided_suffix", "usage_metrics",
               "shared_with_openai", "eval_id"}
MAPPED = {"model", "training_file", "validation_file", "hyperparameters", "method", "suffix", "seed"}
HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")


class JobError(ValueError):
    """The job cannot be imported (unsupported method, wrong values, no local training file)."""


def hyperparameters(job: dict) -> tuple[str, dict, list[str]]:
    """The method (``supervised`` or ``dpo``), the hyperparameters of ``job`` and notes on where they came
    from. Refuses reinforcement fine-tuning, which ftkit does not do."""
    method = job.get("method") or {}
    kind = method.get("type", "supervised")
    if kind == "reinforcement":
        raise JobError(f"method.type {kind!r}: ftkit does not support reinforcement fine-tuning, only supervised "
                       "fine-tuning and DPO (method.type 'supervised' or 'dpo')")
    if kind not in ("supervised", "dpo"):
        raise JobError(f"method.type {kind!r}: unknown; ftkit imports supervised and DPO fine-tuning jobs")
    notes = []
    legacy = job.get("hyperparameters") or {}
    params = ((method.get(kind) or {}).get("hyperparameters")) or {}
    if params and legacy and any(legacy.get(k, "auto") != params.get(k, "auto") for k in HYPERPARAMETERS):
        notes.append(f"top-level hyperparameters {json.dumps(legacy)} differ from method.{kind}'s; "
                     "OpenAI uses method's, and so does this file")
    return kind, dict(params or legacy), notes


def _number(params: dict, key: str, kind: type):
    """``params[key]`` as ``kind``, None for "auto" or absent."""
    value = params.get(key, "auto")
    if value == "auto" or value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or \
            (kind is int and value != int(value)):
        raise JobError(f"hyperparameters.{key}: expected 'auto' or a positive {kind.__name__}, got {value!r}")
    return kind(value)


def _yaml_value(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _short(value, limit: int = 120) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def to_parameters(job: dict, training_file: str | None, validation_file: str | None, name: str) -> str:
    """The parameters YAML (text, with comments) for ``job``; ``name``: the experiment when the job has
    no suffix."""
    if not isinstance(job, dict):
        raise JobError(f"expected one fine-tuning job (a JSON object), got {type(job).__name__}")
    if job.get("object") == "list":
        raise JobError("this is a list of jobs: save one job (client.fine_tuning.jobs.retrieve(ID)) and import that")
    method, params, notes = hyperparameters(job)
    default = TrainConfig()
    remote = job.get("training_file")
    if training_file is None:
        if not remote or str(remote).startswith("file-"):
            raise JobError(f"pass --training-file PATH: the job's training_file {remote!r} is an OpenAI file id, "
                           "not a local file (download it with client.files.content(ID) or use the JSONL you uploaded)")
        training_file = str(remote)

    out = [f"# Imported from an OpenAI fine-tuning job by `ftkit import-openai-job`{_job_id(job)}."]
    model = job.get("model")
    out += [f"# model: OpenAI's {model!r} cannot be fine-tuned locally (its weights are not published).",
            "# Pick an open model and set it here, e.g. a Hugging Face id or a local path; until then",
            f"# ftkit's default ({_yaml_value(_default_model())}) is used:",
            "# model:",
            "#   name: Qwen/Qwen2.5-1.5B-Instruct"]
    suffix = job.get("suffix")
    experiment = _experiment(suffix) or _experiment(name) or "openai-import"
    out.append(f"experiment: {_yaml_value(experiment)}" + ("  # the job's suffix" if _experiment(suffix) else
                                                          "  # the file name (the job has no suffix)"))
    seed = job.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise JobError(f"seed: expected an integer, got {seed!r}")
        out.append(f"seed: {seed}  # the job's seed")

    weight = "OpenAI's chat JSONL is read as it is, per-message weight 0/1 included"
    if remote == training_file:
        source = [f"  # the job's training_file ({weight})"]
    elif str(remote or "").startswith("file-"):
        source = [f"  # the job's training_file {remote!r} is an OpenAI file id, not a local path: this is the",
                  f"  # file given with --training-file ({weight})"]
    else:
        source = [f"  # the job names {remote!r}; this is the file given with --training-file ({weight})"]
    out += ["data:", *source, f"  path: {_yaml_value(str(training_file))}"]
    val = validation_file or job.get("validation_file")
    if val:
        out += [f"  # validation file {val!r}: ftkit draws its validation and test splits from data.path",
                "  # (data.val_fraction, data.test_fraction); list it under data.path to add its records to the pool"]

    out += ["train:", *_train_lines(method, params, default)]
    unknown_hp = sorted(set(params) - set(HYPERPARAMETERS) - ({"beta"} if method == "dpo" else set()))
    if unknown_hp:
        notes.append("hyperparameters not mapped (no ftkit equivalent): " +
                     ", ".join(f"{k}={_short(params[k])}" for k in unknown_hp))
    unknown = sorted(set(job) - MAPPED - BOOKKEEPING)
    if unknown:
        notes.append("fields not mapped: " + "; ".join(f"{k}: {_short(job[k])}" for k in unknown))
    bookkeeping = sorted(set(job) & BOOKKEEPING)
    if bookkeeping:
        notes.append("job bookkeeping, not settings: " + ", ".join(bookkeeping))
    out += [line for note in notes for line in textwrap.wrap(note, 110, initial_indent="# ", subsequent_indent="#   ",
                                                                 break_on_hyphens=False)]
    return "\n".join(out) + "\n"


def _train_lines(method: str, params: dict, default: TrainConfig) -> list[str]:
    lines = []
    if method == "dpo":
        lines.append("  objective: dpo  # method.type dpo: OpenAI's DPO JSONL (input, preferred_output, "
                     "non_preferred_output) is read as it is")
        beta = _number(params, "beta", float)
        lines.append(f"  preference:\n    beta: {_yaml_value(beta)}  # beta" if beta else
                     f"  # beta auto: ftkit's default train.preference.beta ({default.preference.beta:g}) is kept")
        lines.append("  # init_adapter: experiment:<your SFT run>  # DPO usually starts from a supervised adapter")
    epochs = _number(params, "n_epochs", int)
    lines.append(f"  epochs: {epochs}  # n_epochs" if epochs else
                 f"  # n_epochs auto: ftkit's default train.epochs ({default.epochs:g}) is kept")
    batch = _number(params, "batch_size", int)
    lines.append(f"  batch_size: {batch}  # batch_size: examples per optimiser step (ftkit: batch_size x "
                 "gradient_accumulation_steps)" if batch else
                 f"  # batch_size auto: ftkit's default train.batch_size ({default.batch_size}) is kept")
    mult = _number(params, "learning_rate_multiplier", float)
    if mult:
        lines += [f"  # learning_rate_multiplier {mult:g}: OpenAI does not publish the base rate it multiplies, so it",
                  f"  # scales ftkit's default LoRA learning rate ({default.learning_rate:g}) instead",
                  f"  learning_rate: {_yaml_value(float(f'{default.learning_rate * mult:.6g}'))}"]
    else:
        lines.append(f"  # learning_rate_multiplier auto: ftkit's default train.learning_rate ({default.learning_rate:g})"
                     " is kept")
    return lines


def _default_model() -> str:
    from ftkit.core.config import ModelConfig

    return ModelConfig().name


def _job_id(job: dict) -> str:
    return f" (job {job['id']})" if job.get("id") else ""


def _experiment(text) -> str | None:
    """An experiment name from ``text``: letters, digits, '-', '_' and '.'; None when nothing is left."""
    if not text:
        return None
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-.")
    return name or None


def import_job(job_path: str | Path, output: str | Path, training_file: str | None = None,
               validation_file: str | None = None) -> Path:
    """Write the parameters file for the job in ``job_path`` to ``output``; checked with
    :func:`ftkit.core.config.load_config` before it is written."""
    from ftkit.core.config import load_config

    try:
        job = json.loads(Path(job_path).read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise JobError(f"{job_path}: not valid JSON ({e})") from None
    output = Path(output)
    text = to_parameters(job, training_file, validation_file, output.stem)
    load_config(yaml.safe_load(text), source=str(output))  # never write a file ftkit cannot read
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
    return output
