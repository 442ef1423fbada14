"""Coming from OpenAI's fine-tuning API: a job imported as a parameters file, the training JSONL read as it is."""

import json

import pytest

from ftkit.cli import main
from ftkit.core.config import TrainConfig, load_config, read_yaml

JOB = {  # as client.fine_tuning.jobs.retrieve(...) returns it
    "object": "fine_tuning.job", "id": "ftjob-abc123", "model": "gpt-4o-mini-2024-07-18", "created_at": 1721764800,
    "finished_at": None, "fine_tuned_model": None, "organization_id": "org-123", "result_files": [],
    "status": "queued", "validation_file": "file-val456", "training_file": "file-abc123",
    "hyperparameters": {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 1.8},
    "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 8,
                                                                        "learning_rate_multiplier": 1.8}}},
    "trained_tokens": None, "integrations": [{"type": "wandb", "wandb": {"project": "cx"}}], "seed": 683058546,
    "estimated_finish": None, "suffix": "support-bot", "metadata": {"team": "cx"},
}


def _import(tmp_path, job: dict, *extra: str, name: str = "mine.yaml") -> tuple[int, str]:
    (tmp_path / "job.json").write_text(json.dumps(job))
    out = tmp_path / "parameters" / name
    code = main(["import-openai-job", str(tmp_path / "job.json"), "-o", str(out), *extra])
    return code, out.read_text() if out.exists() else ""


def test_job_becomes_a_parameters_file(tmp_path):
    code, text = _import(tmp_path, JOB, "--training-file", "data/train.jsonl")
    assert code == 0
    cfg = load_config(tmp_path / "parameters" / "mine.yaml")
    assert cfg.data.path == "data/train.jsonl" and cfg.experiment == "support-bot" and cfg.seed == 683058546
    assert cfg.train.epochs == 3 and cfg.train.batch_size == 8
    assert cfg.train.learning_rate == pytest.approx(TrainConfig().learning_rate * 1.8)
    assert cfg.model.name == "smollm2-135m-instruct"  # gpt-4o-mini cannot be trained here: the default stays
    assert "cannot be fine-tuned locally" in text and "#   name:" in text
    assert "'file-abc123' is an OpenAI file id, not a local path" in text
    assert "OpenAI does not publish the base rate" in text
    assert "integrations" in text and '"team": "cx"' in text  # not mapped, but listed
    assert "file-val456" in text


def test_auto_and_create_body_keep_ftkit_defaults(tmp_path):
    """The create request (no id, status...), the deprecated top-level hyperparameters, "auto" values."""
    job = {"model": "gpt-4o-mini-2024-07-18", "training_file": "file-x",
           "hyperparameters": {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto",
                               "prompt_loss_weight": 0.01}}
    code, text = _import(tmp_path, job, "--training-file", "t.jsonl", name="from-create.yaml")
    assert code == 0
    cfg, default = load_config(tmp_path / "parameters" / "from-create.yaml"), TrainConfig()
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.learning_rate) == (
        default.epochs, default.batch_size, default.learning_rate)
    assert cfg.experiment == "from-create"  # no suffix: the file name
    assert "n_epochs auto: ftkit's default" in text and "prompt_loss_weight=0.01" in text
    assert set(read_yaml(tmp_path / "parameters" / "from-create.yaml")) == {"experiment", "data", "train"}


def test_reinforcement_is_refused(tmp_path, capsys):
    job = {**JOB, "method": {"type": "reinforcement", "reinforcement": {"hyperparameters": {}}}}
    code, text = _import(tmp_path, job, "--training-file", "t.jsonl")
    assert code == 2 and text == ""
    assert "method.type 'reinforcement': ftkit does not support" in capsys.readouterr().err


def test_a_dpo_job_becomes_a_dpo_run(tmp_path):
    from ftkit.core.config import load_config

    job = {**JOB, "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 2}}}}
    code, text = _import(tmp_path, job, "--training-file", "t.jsonl")
    assert code == 0 and "objective: dpo" in text and "beta: 0.25" in text
    params = read_yaml(next((tmp_path / "parameters").glob("*.yaml")))
    cfg = load_config(**params)
    assert cfg.train.objective == "dpo" and cfg.train.preference.beta == 0.25 and cfg.train.epochs == 2


def test_file_id_without_a_local_training_file_is_refused(tmp_path, capsys):
    code, _ = _import(tmp_path, JOB)
    assert code == 2 and "pass --training-file PATH" in capsys.readouterr().err


def test_openai_jsonl_with_weights_is_read_as_it_is(tmp_path, tokenizer):
    """OpenAI's chat JSONL, per-message weight included, goes through stage 01 unchanged and a weight-0
    reply is not trained."""
    from ftkit.core.files import read_jsonl
    from ftkit.core.masking import build_example, trained_text
    from ftkit.core.paths import RunPaths
    from ftkit.data import dataset as data

    records = [{"messages": [{"role": "system", "content": "You are terse."},
                             {"role": "user", "content": f"What is {i} plus {i}?"},
                             {"role": "assistant", "content": f"Maybe {i + 1}.", "weight": 0},
                             {"role": "user", "content": "Are you sure?"},
                             {"role": "assistant", "content": f"It is {2 * i}.", "weight": 1}]} for i in range(12)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = load_config(outputs_dir=str(tmp_path / "out"), data={"path": str(path), "val_fraction": 0.0,
                                                               "test_fraction": 0.0, "near_duplicate_threshold": None})
    paths = RunPaths(cfg.outputs_dir, cfg.experiment)
    data.prepare(cfg.data, paths, cfg.seed)
    kept = sorted((r["messages"] for r in read_jsonl(paths.split("train"))), key=lambda m: m[1]["content"])
    assert kept == sorted((r["messages"] for r in records), key=lambda m: m[1]["content"])
    assert trained_text(tokenizer, build_example(tokenizer, kept[0])) == "It is 0.<|im_end|>"
