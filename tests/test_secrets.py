"""Security: keys never written anywhere, no model code run unless asked, no pickle weights unless asked.

The smoke run (``make run EXP=smoke``, shared through tests/conftest.py) has keys planted in its
environment, as a user's machine does: every file it wrote, and make's output, is searched for them.
A key written into a parameters file is refused with its line before anything runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import PLANTED_SECRETS, ROOT, run_make
from reliability import tally

pytestmark = pytest.mark.reliability


def _hits(folder: Path, secrets: dict[str, str]) -> list[str]:
    hits = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = f.read_bytes()
        hits += [f"{f}: {name}" for name, value in secrets.items() if value.encode() in data]
    return hits


def test_keys_in_the_environment_appear_in_no_output(smoke_make):
    run, stdout, stderr = smoke_make
    files = [p for p in run.rglob("*") if p.is_file()]
    assert len(files) > 40  # reports, notebooks, logs, metrics, configs, model files, GGUF
    assert not _hits(run, PLANTED_SECRETS)
    assert not [n for n, v in PLANTED_SECRETS.items() if v in stdout + stderr]
    m5 = json.loads((run / "metrics" / "05_host.json").read_text())
    assert m5["api_key_required"] is True  # the planted FTKIT_API_KEY was in force, not ignored
    tally("security", inputs=len(files), crashes=0)


def _params_with_key(tmp_path: Path, key: str, where: str) -> Path:
    params = yaml.safe_load((ROOT / "parameters" / "smoke.yaml").read_text())
    if where == "host":
        params["host"]["api_key"] = key
    else:
        params["overrides"] = {"host.api_key": key}
    p = tmp_path / "leaky.yaml"
    p.write_text(yaml.safe_dump(params, sort_keys=False))
    return p


@pytest.mark.parametrize("where", ["host", "overrides"])
def test_a_key_in_a_parameters_file_is_refused_before_anything_is_written(tmp_path, where):
    key = f"sk-planted-{where}-0123456789"
    params = _params_with_key(tmp_path, key, where)
    line = next(n for n, text in enumerate(params.read_text().splitlines(), 1) if "api_key" in text)
    out = tmp_path / "outputs"
    for cmd in (["check-params", str(params)], ["run", str(params), "--outputs-dir", str(out)]):
        proc = subprocess.run([sys.executable, "-m", "ftkit", *cmd], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 2, proc.stderr
        assert f"{params}:{line}: host.api_key:" in proc.stderr and "FTKIT_API_KEY" in proc.stderr
        assert key not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    made = run_make("run", "EXP=leaky", f"PARAMS={params}", f"OUTPUTS={out}", timeout=300)
    assert made.returncode != 0 and f"{params}:{line}: host.api_key:" in made.stderr
    assert not out.exists() or not _hits(out, {"key": key})
    assert not list(out.rglob("*.ipynb"))  # papermill never ran, so no notebook holds the key
    tally("security", inputs=3, crashes=0)


def test_a_key_set_in_a_notebook_cell_is_hidden_in_every_saved_config(tmp_path):
    from ftkit.core.config import HIDDEN, load_config
    from ftkit.ui.parameter_form import config_fields, to_yaml

    key = "sk-notebook-cell-secret-42"
    cfg = load_config(host={"api_key": key, "port": 0})
    assert cfg.host.api_key == key  # the run uses it
    saved = [json.dumps(cfg.to_dict()), to_yaml(cfg, "mine")]
    assert not any(key in text for text in saved) and HIDDEN in saved[0]
    assert "host.api_key" not in {f.key for f in config_fields()}  # the form never shows or saves it
    again = load_config(cfg.to_dict())  # a saved config read back holds no key, and no placeholder as one
    assert again.host.api_key is None


def test_model_code_is_not_run_without_trust_remote_code(tmp_path, tiny_path, smoke):
    """A model folder whose config points at its own Python code (``auto_map``): without
    ``model.trust_remote_code`` transformers' own class is loaded and that code never runs (it would write a
    marker file); with it, it runs."""
    import shutil

    from ftkit.core.config import ModelConfig
    from ftkit.core.modeling import load_model

    model = tmp_path / "custom"
    shutil.copytree(tiny_path, model)
    marker = tmp_path / "code-ran"
    (model / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                            "from transformers import LlamaForCausalLM as EvilForCausalLM\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    loaded = load_model(str(model), ModelConfig(name=str(model)))
    assert type(loaded).__name__ == "LlamaForCausalLM" and not marker.exists()  # transformers' own class
    load_model(str(model), ModelConfig(name=str(model), trust_remote_code=True))
    assert marker.exists()  # the setting is what decides: with it, the folder's code runs
    m3 = json.loads((smoke / "metrics" / "03_train.json").read_text())
    assert m3["trust_remote_code"] is False and m3["allow_pickle_weights"] is False
    report = (smoke / "reports" / "03_train.html").read_text()
    assert "not run (model.trust_remote_code: false)" in report and "safetensors only" in report
    tally("security", inputs=1, crashes=0)


def test_pickle_weights_are_refused_unless_allowed(tmp_path, tiny_path):
    """A model folder with only ``pytorch_model.bin``: refused before it is opened (unpickling it would run
    the code it carries), loaded when ``model.allow_pickle_weights`` says so, to the same logits."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from ftkit.core.config import ModelConfig
    from ftkit.core.modeling import UnsafeWeightsError, load_model

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_path, pickled)
    state = {}
    for f in pickled.glob("*.safetensors"):
        state.update(load_file(f))
        f.unlink()
    for f in pickled.glob("*.safetensors.index.json"):
        f.unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    with pytest.raises(UnsafeWeightsError) as e:
        load_model(str(pickled), ModelConfig(name=str(pickled)))
    assert str(pickled / "pytorch_model.bin") in str(e.value) and "model.allow_pickle_weights" in str(e.value)
    allowed = load_model(str(pickled), ModelConfig(name=str(pickled), allow_pickle_weights=True))
    safe = load_model(tiny_path, ModelConfig(name="tiny-random"))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(allowed(input_ids=ids).logits, safe(input_ids=ids).logits)
    tally("security", inputs=1, crashes=0)


def test_pii_scrubbing_shows_in_the_01_report(tmp_path):
    """``data.pii: scrub`` on records holding emails and phone numbers: the report says how many records were
    scrubbed and where, shows the text as training sees it, and no value found appears in the report."""
    import papermill

    rows = [{"messages": [{"role": "user", "content": f"Hi, I am customer {i}, write to jane.doe{i}@example.com or "
                                                      f"call +1 415 555 01{i:02d} about order {i}."},
                          {"role": "assistant", "content": f"Thanks, customer {i}: we will email you today."}]}
            for i in range(30)]
    data = tmp_path / "pii.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "01.ipynb"
    papermill.execute_notebook(str(ROOT / "notebooks" / "01_data_prep.ipynb"), str(out), cwd=str(ROOT),
                               parameters={"experiment": "pii", "outputs_dir": str(tmp_path / "out"),
                                           "data": {"path": str(data), "pii": "scrub"}}, progress_bar=False)
    nb = json.loads(out.read_text())
    shown = "\n".join("".join(o.get("data", {}).get("text/markdown", "")) + "".join(o.get("text", ""))
                      for c in nb["cells"] for o in c.get("outputs", []))
    assert "PII **scrubbed** in **30** records" in shown and "[EMAIL]" in shown and "[PHONE]" in shown
    assert f"{data}:1" in shown
    assert "@example.com" not in shown and "555 01" not in shown
    split = (tmp_path / "out" / "pii" / "data" / "train.jsonl").read_text()
    assert "@example.com" not in split and "[EMAIL]" in split
    tally("security", inputs=1, crashes=0)
