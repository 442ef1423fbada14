import json
from pathlib import Path

import pytest
import yaml

from ftkit.core.config import SECTIONS, ConfigError, ExperimentConfig, check_top_level, load_config, read_yaml

NOTEBOOKS = ["01_data_prep", "02_format_conversion", "03_train", "04_evaluate", "05_host"]


def test_defaults_are_valid():
    cfg = load_config()
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.model.name == "smollm2-135m-instruct"
    assert cfg.train.lora.target_modules == "all-linear"


def test_deep_merge_keeps_other_defaults():
    cfg = load_config(train={"lora": {"r": 8}, "max_steps": 3})
    assert cfg.train.lora.r == 8
    assert cfg.train.lora.alpha == 32  # untouched default
    assert cfg.train.max_steps == 3
    assert cfg.train.learning_rate == 2e-4


def test_unknown_key_names_key_and_suggests():
    with pytest.raises(ConfigError) as e:
        load_config(train={"learnin_rate": 1e-4})
    msg = str(e.value)
    assert "train.learnin_rate" in msg and "did you mean 'learning_rate'" in msg


def test_all_errors_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(train={"learnin_rate": 1e-4, "batch_size": "four"}, model={"dtype": "bfloat61"})
    assert len(e.value.errors) == 3
    msg = str(e.value)
    assert "train.batch_size: expected an integer" in msg
    assert "model.dtype: invalid value 'bfloat61' (did you mean 'bfloat16'?)" in msg


def test_types_checked():
    assert load_config(train={"learning_rate": 1}).train.learning_rate == 1.0  # int is a fine float
    assert load_config(train={"learning_rate": "1e-4"}).train.learning_rate == 1e-4  # YAML 1.1 reads 1e-4 as str
    with pytest.raises(ConfigError, match="expected a number, got 'fast'"):
        load_config(train={"learning_rate": "fast"})
    with pytest.raises(ConfigError, match="expected true or false"):
        load_config(train={"deterministic": "yes"})
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(train={"batch_size": True})
    with pytest.raises(ConfigError, match="list item 3"):
        load_config(evaluate={"rules": {"required_phrases": ["ok", 3]}})


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="together below 1"):
        load_config(data={"val_fraction": 0.6, "test_fraction": 0.5})
    with pytest.raises(ConfigError, match="target_modules"):
        load_config(train={"lora": {"target_modules": 5}})


def test_data_encoding_is_a_known_line_safe_codec():
    assert load_config(data={"encoding": "cp1252"}).data.encoding == "cp1252"
    with pytest.raises(ConfigError, match="data.encoding: 'utf-9': unknown text encoding; use a Python codec name"):
        load_config(data={"encoding": "utf-9"})
    with pytest.raises(ConfigError, match="data.encoding: 'utf-16' is not supported.*iconv -f utf-16 -t utf-8"):
        load_config(data={"encoding": "utf-16"})


def test_dotted_overrides_apply_last():
    cfg = load_config({"train": {"max_steps": 10}, "overrides": {"train.max_steps": 2}},
                      overrides={"train.lora.r": 4})
    assert cfg.train.max_steps == 2 and cfg.train.lora.r == 4
    with pytest.raises(ConfigError, match="train.lora.rr: unknown key; did you mean 'r'"):
        load_config(overrides={"train.lora.rr": 4})


def test_top_level_unknown_key():
    with pytest.raises(ConfigError, match="trian: unknown key; did you mean 'train'"):
        check_top_level({"trian": {}}, "x.yaml")
    with pytest.raises(ConfigError, match="trian"):
        load_config({"trian": {}})


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  max_steps: 3\n  lora: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        read_yaml(p)


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).parents[1] / "parameters").glob("*.yaml")))
def test_shipped_parameter_files_validate(root, name):
    path = root / "parameters" / f"{name}.yaml"
    params = read_yaml(path)
    check_top_level(params, str(path))
    cfg = load_config(params, source=str(path))
    assert cfg.experiment == name


def _cells(root, name):
    return json.loads((root / "notebooks" / f"{name}.ipynb").read_text())["cells"]


def test_parameters_cell_identical_and_complete(root):
    sources = []
    for name in NOTEBOOKS:
        tagged = [c for c in _cells(root, name) if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{name}: needs exactly one cell tagged 'parameters'"
        sources.append("".join(tagged[0]["source"]))
    assert all(s == sources[0] for s in sources), "parameters cells differ between notebooks"
    names = {line.split(":")[0] for line in sources[0].splitlines() if line and not line.startswith("#")}
    assert names == set(SECTIONS) | {"overrides"}


def test_papermill_lists_parameters(root):
    import papermill

    params = papermill.inspect_notebook(str(root / "notebooks" / "03_train.ipynb"))
    assert params["train"]["inferred_type_name"] == "dict"
    assert "learning_rate" in params["train"]["help"]
    assert params["seed"]["default"] == "42"


def test_notebooks_committed_without_outputs(root):
    for name in NOTEBOOKS:
        for c in _cells(root, name):
            if c["cell_type"] == "code":
                assert not c.get("outputs") and c.get("execution_count") is None, f"{name} has outputs"


def test_notebooks_are_valid_nbformat(root):
    """Every cell has its id (nbformat 4.5): without one nbformat warns on every run and will refuse."""
    import nbformat

    for name in NOTEBOOKS:
        path = root / "notebooks" / f"{name}.ipynb"
        nbformat.validate(nbformat.read(path, as_version=4))
        ids = [c.get("id") for c in json.loads(path.read_text(encoding="utf-8"))["cells"]]  # as committed: read() adds missing ones
        assert all(ids) and len(set(ids)) == len(ids), f"{name}: missing or repeated cell ids"


def test_notebook_parameter_defaults_match_code(root):
    src = "".join(next(c for c in _cells(root, "01_data_prep")
                       if "parameters" in c.get("metadata", {}).get("tags", []))["source"])
    ns: dict = {}
    exec(src, ns)  # plain literals only
    cfg = ExperimentConfig()
    assert (ns["experiment"], ns["seed"], ns["outputs_dir"]) == (cfg.experiment, cfg.seed, cfg.outputs_dir)


def test_parameters_yaml_only_differs_from_defaults(root):
    defaults = ExperimentConfig().to_dict()
    params = yaml.safe_load((root / "parameters" / "demo.yaml").read_text())
    for section, values in params.items():
        if isinstance(values, dict):
            for k, v in values.items():
                if not isinstance(v, dict):
                    assert defaults[section][k] != v, f"demo.yaml repeats the default {section}.{k}={v!r}"


def test_every_module_is_reachable_lazily(root):
    """After ``import ftkit``, every module is reachable by attribute (``ftkit.host.serve``), as notebooks write."""
    import subprocess
    import sys

    names = [".".join(p.relative_to(root).with_suffix("").parts) for p in (root / "ftkit").rglob("*.py")
             if p.stem not in ("__init__", "__main__")]
    code = ("import functools, ftkit\n"
            f"for n in {names!r}:\n"
            "    m = functools.reduce(getattr, n.split('.')[1:], ftkit)\n"
            "    assert m.__name__ == n, (n, m)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and len(names) > 40, proc.stderr[-2000:]


def test_floor_constraints_are_the_declared_floors(root):
    """`make test-floor` installs exactly the oldest versions pyproject.toml accepts (torch aside: see the file)."""
    import re

    import tomllib

    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = dict(re.match(r"([\w-]+)>=([\w.]+)", d).groups() for d in deps if ">=" in d)
    pinned = dict(line.split("==") for line in (root / "tests" / "floors.txt").read_text().splitlines()
                  if line and not line.startswith("#"))
    assert pinned and all(floors[name] == version.removesuffix(".0") or floors[name] == version
                          for name, version in pinned.items()), (floors, pinned)
    assert set(pinned) == {"transformers", "peft", "accelerate", "bitsandbytes"}


def test_auto_dtype_is_bf16_where_the_cpu_computes_it(monkeypatch):
    """`model.dtype: auto` on CPU: bfloat16 when the CPU multiplies bf16 natively (AVX512-BF16, AMX), except
    for full fine-tuning (its small updates would round away in bf16 weights); float32 without."""
    import torch

    from ftkit.core import modeling
    from ftkit.core.config import ModelConfig

    cpu = torch.device("cpu")
    monkeypatch.setattr(modeling, "cpu_computes_bf16", lambda: True)
    assert modeling.resolve_dtype(ModelConfig(), cpu) == torch.bfloat16
    assert modeling.resolve_dtype(ModelConfig(), cpu, full_precision=True) == torch.float32
    assert modeling.resolve_dtype(ModelConfig(dtype="float32"), cpu) == torch.float32
    monkeypatch.setattr(modeling, "cpu_computes_bf16", lambda: False)
    assert modeling.resolve_dtype(ModelConfig(), cpu) == torch.float32
    assert modeling.resolve_dtype(ModelConfig(dtype="bfloat16"), cpu, full_precision=True) == torch.bfloat16
