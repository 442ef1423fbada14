"""The interactive half: the hyperparameter form (built headlessly, driven through the widgets' own
API), the session detection that keeps widgets out of headless runs, and the live view's Stop."""

import json
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, copy_run

import ftkit
from ftkit.core.config import ExperimentConfig, load_config
from ftkit.ui.parameter_form import ParameterForm, config_fields, differences, to_yaml


def _form(tmp_path, cfg=None, **kw):
    (tmp_path / "parameters").mkdir(exist_ok=True)
    return ParameterForm(cfg or load_config(ROOT / "parameters" / "smoke.yaml"), root=tmp_path, **kw)


def test_every_config_key_has_a_widget_of_its_type(tmp_path):
    import ipywidgets as w

    form = _form(tmp_path)
    keys = {f.key for f in config_fields()}
    assert set(form.inputs) == keys and len(keys) > 100
    assert isinstance(form.inputs["train.method"], w.Dropdown)
    assert form.inputs["train.method"].options == ("lora", "qlora", "dora", "full")
    assert isinstance(form.inputs["train.packing"], w.Checkbox)
    assert isinstance(form.inputs["train.learning_rate"], w.FloatLogSlider)
    assert isinstance(form.inputs["data.val_fraction"], w.FloatSlider)
    assert isinstance(form.inputs["train.max_steps"], w.IntText)
    assert isinstance(form.inputs["train.gradient_checkpointing"], w.Dropdown)  # bool | None: auto/true/false
    assert isinstance(form.inputs["train.lora.target_modules"], w.Text)  # Any: YAML text
    # help text is the field's docstring; changed values are marked
    assert any("Padding-free packing" in str(getattr(c, "value", "")) for c in _walk(form.widget))
    assert form.labels["model.name"].value == "<b>model.name</b>"  # smoke.yaml sets tiny-random
    assert form.labels["train.method"].value == "train.method"


def _walk(widget):
    yield widget
    for child in getattr(widget, "children", ()):
        yield from _walk(child)


def test_values_set_through_widgets_save_yaml_that_load_config_reads_back(tmp_path):
    form = _form(tmp_path)
    form.inputs["train.learning_rate"].value = 5e-4
    form.inputs["train.method"].value = "dora"
    form.inputs["train.lora.target_modules"].value = "[q_proj, v_proj]"
    form.inputs["train.gradient_checkpointing"].value = True
    form.inputs["data.val_fraction"].value = 0.2
    form.inputs["evaluate.rules.max_sentences"].value = "4"  # int | None as YAML text
    form.name.value = "tweaked"
    form.save_button.click()
    path = tmp_path / "parameters" / "tweaked.yaml"
    assert path.exists(), form.status.value
    saved = load_config(path)
    expected = form.config.to_dict() | {"experiment": "tweaked"}
    assert saved.to_dict() == expected
    assert saved.train.lora.target_modules == ["q_proj", "v_proj"] and saved.evaluate.rules.max_sentences == 4
    # only the differences from the defaults are written
    written = yaml.safe_load(path.read_text())
    assert "method" in written["train"] and "batch_size" not in written["train"] and "host" in written
    assert "packing" not in written["train"] and "outputs_dir" not in written
    assert "make run EXP=tweaked" in form.status.value


def test_invalid_values_show_their_error_beside_the_field_and_are_not_saved(tmp_path):
    form = _form(tmp_path)
    form.inputs["train.max_steps"].value = 0
    assert "positive number" in form.messages["train.max_steps"].value and form.config is None
    form.inputs["train.max_steps"].value = 5
    assert form.messages["train.max_steps"].value == "" and form.config is not None
    form.inputs["data.columns"].value = "{user: q, asistant: a"  # not YAML
    assert "not valid YAML" in form.messages["data.columns"].value
    form.inputs["data.columns"].value = "{user: q, asistant: a}"  # YAML, but a role load_config rejects
    assert "unknown role(s) asistant" in form.messages["data.columns"].value
    form.name.value = "broken"
    assert form.save() is None and "fix the values" in form.status.value
    assert not (tmp_path / "parameters" / "broken.yaml").exists()
    form.inputs["data.columns"].value = "{}"
    form.inputs["data.path"].value = "no/such/file.csv"
    assert "not found" in form.messages["data.path"].value  # a warning: the file may come later
    assert form.config is not None


def test_save_refuses_to_overwrite_a_hand_written_file(tmp_path):
    form = _form(tmp_path)
    (tmp_path / "parameters" / "mine.yaml").write_text("experiment: mine\n")
    assert form.save("mine") is None and "not written by this form" in form.status.value
    form.overwrite.value = True
    assert form.save("mine") is not None
    assert form.save("../escape") is None


def test_differences_round_trip_for_every_shipped_parameters_file():
    for path in sorted((ROOT / "parameters").glob("*.yaml")):
        cfg = load_config(path)
        again = load_config(yaml.safe_load(to_yaml(cfg, cfg.experiment)))
        assert again.to_dict() == cfg.to_dict() | {"outputs_dir": "outputs"}, path.name
    assert differences(ExperimentConfig()) == {}


def test_estimate_line_follows_the_values(tiny_converted, tmp_path):
    from ftkit.ui.estimate_line import estimate_line

    paths = copy_run(tiny_converted, tmp_path, "tiny")
    cfg = load_config(experiment="tiny", outputs_dir=str(tmp_path), model={"name": "tiny-random"})
    form = _form(tmp_path, cfg, estimate=estimate_line)
    first = form.estimate_line.value
    assert "stage 02's token counts" in first and "GB" in first and "trainable" in first, first
    form.inputs["train.lora.r"].value = 64
    assert form.estimate_line.value != first  # more trainable parameters
    form.inputs["train.max_steps"].value = 0
    assert "fix the values" in form.estimate_line.value
    assert paths.tokens("train").exists()


def test_no_widget_outside_an_interactive_session():
    code = ("import sys, ftkit, ftkit.ui; cfg = ftkit.load_config(); "
            "print(ftkit.ui.form(cfg), 'ipywidgets' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["None", "False"]


def test_headless_notebook_run_has_no_widget(tmp_path):
    """papermill sends cells with allow_stdin false: ftkit.core.session.interactive() is False there,
    even without FTKIT_HEADLESS."""
    import nbformat
    import papermill

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("from ftkit.core.session import interactive\nprint('interactive', interactive())")]
    src, out = tmp_path / "in.ipynb", tmp_path / "out.ipynb"
    nbformat.write(nb, src)
    env_clean = {k: v for k, v in __import__("os").environ.items() if k != "FTKIT_HEADLESS"}
    subprocess.run([sys.executable, "-m", "papermill", str(src), str(out), "--no-progress-bar", "-k", "python3"], check=True,
                   env=env_clean, capture_output=True)
    text = json.dumps(json.loads(out.read_text())["cells"][0]["outputs"])
    assert "interactive False" in text
    assert papermill  # imported: the notebooks extra is installed


@pytest.fixture
def interrupt_at_step_3(monkeypatch):
    """The live view shown (as in an interactive session) and the kernel interrupted (SIGINT, what the
    notebook's Interrupt button sends) at step 3."""
    import os
    import signal

    from ftkit.core import session
    from ftkit.train import live

    shown = []
    original = live.LiveView.on_step_end

    def interrupt_at_3(self, args, state, control, **kw):
        if state.global_step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, args, state, control, **kw)

    monkeypatch.setattr(session, "interactive", lambda: True)
    monkeypatch.setattr(live.LiveView, "on_step_end", interrupt_at_3)
    monkeypatch.setattr(live.LiveView, "__init__", _with_display(live.LiveView.__init__, shown))
    return shown


def _with_display(init, shown):
    def __init__(self, stop_file, display=None, redraw_seconds=0.0):
        init(self, stop_file, display=shown.append, redraw_seconds=redraw_seconds)
    return __init__


def _train(tmp_path, tiny_converted, name):
    paths = copy_run(tiny_converted, tmp_path, name)
    cfg = load_config(experiment=name, outputs_dir=str(tmp_path), model={"name": "tiny-random"},
                      train={"max_steps": 8, "batch_size": 4, "logging_steps": 1, "eval_steps": 0,
                             "learning_rate": 5e-3, "lora": {"dropout": 0.0}})
    return ftkit.train.run(cfg, paths), paths


def _losses(history):
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def test_interrupt_checkpoints_and_the_next_run_resumes(tmp_path, tiny_converted, interrupt_at_step_3, monkeypatch):
    import signal

    before = signal.getsignal(signal.SIGINT)
    stopped, paths = _train(tmp_path, tiny_converted, "stopped")
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    view = interrupt_at_step_3[0]
    assert stopped.metrics["stopped_at_step"] == 3 and stopped.metrics["steps"] == 3
    assert stopped.metrics["planned_steps"] == 8
    assert (paths.checkpoints_dir / "checkpoint-3" / "ftkit_checkpoint_complete.json").exists()
    assert not paths.stop_request.exists() and paths.adapter_dir.exists()
    # the view drew the curves and ended with the final figures
    widgets = {w.__class__.__name__ for w in _walk(view)}
    assert {"HTML", "Image"} <= widgets
    image = next(w for w in _walk(view) if w.__class__.__name__ == "Image")
    assert image.value[:4] == b"\x89PNG"
    stats = next(w for w in _walk(view) if "ftkit-live-stats" in w._dom_classes)
    assert stats.value.startswith("finished 3/8") and "tokens/s" in stats.value

    monkeypatch.undo()  # no click this time
    resumed = ftkit.train.run(load_config(experiment="stopped", outputs_dir=str(tmp_path), model={"name": "tiny-random"},
                                          train={"max_steps": 8, "batch_size": 4, "logging_steps": 1, "eval_steps": 0,
                                                 "learning_rate": 5e-3, "lora": {"dropout": 0.0}}), paths)
    assert resumed.metrics["resumed_from"].endswith("checkpoint-3") and resumed.metrics["steps"] == 8
    assert resumed.metrics["stopped_at_step"] is None and resumed.metrics["steps_this_run"] == 5
    whole, _ = _train(tmp_path, tiny_converted, "whole")
    a, b = _losses(resumed.history), _losses(whole.history)
    assert set(a) == set(b) == set(range(1, 9))
    assert all(abs(a[s] - b[s]) < 1e-4 for s in a), (a, b)


def test_stop_file_stops_a_headless_run(tmp_path, tiny_converted, monkeypatch):
    """`touch outputs/<exp>/STOP` from a terminal does what the button does (no widget involved)."""
    from ftkit.train import live

    original = live.StopOnRequest.on_step_end

    def touch_at_2(self, args, state, control, **kw):
        if state.global_step == 2:
            self.stop_file.touch()
        return original(self, args, state, control, **kw)

    monkeypatch.setattr(live.StopOnRequest, "on_step_end", touch_at_2)
    result, paths = _train(tmp_path, tiny_converted, "filestop")
    assert result.metrics["stopped_at_step"] == 2 and "ipywidgets" not in result.metrics.get("device_plan", {})
    assert (paths.checkpoints_dir / "checkpoint-2" / "ftkit_checkpoint_complete.json").exists()


@pytest.fixture
def fake_colab(monkeypatch):
    """Colab's own modules (google.colab.files, .drive) as Colab defines them; ftkit cannot reach Colab here."""
    import types

    calls = {"mounted": [], "uploads": 0}
    google, colab = types.ModuleType("google"), types.ModuleType("google.colab")
    files, drive = types.ModuleType("google.colab.files"), types.ModuleType("google.colab.drive")

    def upload():
        calls["uploads"] += 1
        return {"tickets.csv": b"question,answer\nhi,hello\n"}

    files.upload = upload
    drive.mount = lambda where: calls["mounted"].append(where)
    colab.files, colab.drive, google.colab = files, drive, colab
    for name, mod in (("google", google), ("google.colab", colab), ("google.colab.files", files),
                      ("google.colab.drive", drive)):
        monkeypatch.setitem(sys.modules, name, mod)
    return calls


def test_colab_upload_is_asked_once_per_experiment_and_drive_is_mounted(tmp_path, fake_colab):
    from ftkit.ui.colab import resolve_data_path

    first = resolve_data_path({"path": "upload", "columns": {"user": "question"}}, tmp_path / "upload")
    assert first == {"path": str(tmp_path / "upload" / "tickets.csv"), "columns": {"user": "question"}}
    assert (tmp_path / "upload" / "tickets.csv").read_bytes().startswith(b"question")
    again = resolve_data_path({"path": "upload"}, tmp_path / "upload")  # the next notebook: no new dialog
    assert again["path"] == first["path"] and fake_colab["uploads"] == 1
    on_drive = resolve_data_path({"path": "/content/drive/MyDrive/t.jsonl"}, tmp_path / "u2")
    assert on_drive["path"] == "/content/drive/MyDrive/t.jsonl" and fake_colab["mounted"] == ["/content/drive"]


def test_outside_colab_the_data_path_is_left_alone(tmp_path):
    from ftkit.ui.colab import resolve_data_path

    assert "google.colab" not in sys.modules
    assert resolve_data_path({"path": "upload"}, tmp_path) == {"path": "upload"}


def test_a_second_interrupt_stops_at_once(tmp_path):
    import os
    import signal
    import time

    from ftkit.train.live import StopOnRequest

    stop = StopOnRequest(tmp_path / "STOP")
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), stop.catching_interrupts():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        assert stop.interrupted  # the first one only asked for a clean stop
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
    assert signal.getsignal(signal.SIGINT) is before
