"""The notebooks as a person uses them, in a real browser: Debian's chromium driven by Playwright.

JupyterLab starts from `make lab` (LAB_PORT, no browser of its own), the browser opens
01_data_prep.ipynb, runs it top to bottom on the smoke experiment, changes values in the
hyperparameter form (an invalid one first: its error must show) and saves them; the saved YAML then
runs with `make run`, and every stage's HTML report and the index page are opened and checked.
Screenshots go to outputs/test-artifacts/browser/ (FTKIT_ARTIFACTS to change it). `make test-browser`.
"""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run_make

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("FTKIT_CHROMIUM", "/usr/bin/chromium")
SAVED = "browser-smoke"
STAGES = {"01_data_prep": "Data preparation", "02_format_conversion": "Format conversion", "03_train": "Train",
          "04_evaluate": "Evaluate", "05_host": "Host"}
# every code cell has run (no "[*]" queued, no "[ ]" skipped after an error)
ALL_RAN = ("() => { const ps = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')];"
           " return ps.length > 0 && ps.every(e => !e.textContent.includes('*')); }")


@pytest.fixture(scope="module")
def artifacts():
    d = Path(os.environ.get("FTKIT_ARTIFACTS", ROOT / "outputs" / "test-artifacts" / "browser"))
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """`make lab` on a free port, with autosave off (the committed notebooks must stay without outputs)."""
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} not found: apt-get install chromium (or set FTKIT_CHROMIUM)"
    settings = tmp_path_factory.mktemp("lab-settings")
    for plugin, name, value in (("docmanager-extension", "plugin", {"autosave": False}),
                                ("apputils-extension", "notification", {"fetchNews": "false"})):
        (settings / "@jupyterlab" / plugin).mkdir(parents=True, exist_ok=True)
        (settings / "@jupyterlab" / plugin / f"{name}.jupyterlab-settings").write_text(json.dumps(value))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_TOKEN": token, "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path_factory.mktemp("lab-workspaces"))}
    env.pop("FTKIT_HEADLESS", None)
    log = (tmp_path_factory.mktemp("lab-log") / "lab.log").open("w")
    proc = subprocess.Popen(["make", "lab", f"LAB_PORT={port}"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, Path(log.name).read_text()[-3000:]
            time.sleep(0.5)
    yield url, token
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def _new_cell_after_parameters(page):
    """Select the parameters cell (the third) from the keyboard and open a new cell below it."""
    cells = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell")
    cells.first.click()
    for key in ("Escape", "ArrowDown", "ArrowDown", "b", "Enter"):
        page.keyboard.press(key)
    assert cells.nth(2).locator(".cm-content").text_content().startswith(
        "# Parameters"), "the cell above the new one is not the parameters cell"


def _no_error_output(page):
    assert page.locator("[data-mime-type='application/vnd.jupyter.error']").count() == 0
    assert page.locator(".jp-OutputArea-output:has-text('Traceback')").count() == 0


def test_notebook_form_save_run_and_reports(lab, browser, artifacts, tmp_path):
    url, token = lab
    notebook = ROOT / "notebooks" / "01_data_prep.ipynb"
    committed = notebook.read_bytes()
    saved = ROOT / "parameters" / f"{SAVED}.yaml"
    if saved.exists():  # an interrupted earlier run of this test left it; never someone else's file
        from ftkit.ui.parameter_form import SAVED_HEADER

        assert saved.read_text().startswith(SAVED_HEADER), f"{saved} exists and is not the form's: move it"
        saved.unlink()
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(f"{url}/lab/workspaces/form/tree/notebooks/01_data_prep.ipynb?reset&token={token}")
        page.wait_for_selector(".jp-StatusBar-TextItem:has-text('| Idle')", timeout=120_000)
        # what papermill does with -p: a cell after the parameters cell that sets the experiment
        _new_cell_after_parameters(page)
        page.keyboard.insert_text(f'experiment = "smoke"\noutputs_dir = "{tmp_path / "lab-outputs"}"')
        page.keyboard.press("Escape")
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
        page.wait_for_timeout(1000)
        page.wait_for_function(ALL_RAN, timeout=300_000, polling=500)
        prompts = [e.text_content() for e in page.locator(".jp-CodeCell .jp-InputArea-prompt").all()]
        assert all(p.strip().startswith("[") and p.strip()[1].isdigit() for p in prompts), prompts
        _no_error_output(page)
        assert page.locator(".jp-OutputArea-output:has-text('parameters/smoke.yaml read first')").count() == 1
        assert (tmp_path / "lab-outputs" / "smoke" / "metrics" / "01_data_prep.json").exists()
        page.locator(".jp-OutputArea-output:has-text('Lengths')").count()  # layout settles
        page.screenshot(path=str(artifacts / "01-ran.png"))

        form = page.locator(".ftkit-form")
        assert form.count() == 1
        demo_size = form.locator(".ftkit-field-data-demo_size input")
        demo_size.scroll_into_view_if_needed()
        assert demo_size.input_value() == "200"  # smoke.yaml's value, read by the interactive session
        # an invalid value: load_config's own message beside the field, and Save refuses
        max_records = form.locator(".ftkit-field-data-max_records input")
        max_records.fill("many")
        max_records.press("Tab")
        error = form.locator(".ftkit-error", has_text="expected an integer")
        error.wait_for(timeout=10_000)
        page.screenshot(path=str(artifacts / "form-error.png"))
        max_records.fill("")
        max_records.press("Tab")
        error.wait_for(state="detached", timeout=10_000)
        demo_size.fill("160")
        demo_size.press("Tab")
        name = form.locator(".ftkit-save-name input")
        name.fill(SAVED)
        name.press("Tab")
        form.locator("button.ftkit-save").click()
        form.locator(".ftkit-save-status", has_text=f"saved parameters/{SAVED}.yaml").wait_for(timeout=10_000)
        form.locator(".ftkit-save-status").scroll_into_view_if_needed()
        page.screenshot(path=str(artifacts / "form-saved.png"))
        values = yaml.safe_load(saved.read_text())
        assert values["experiment"] == SAVED and values["data"]["demo_size"] == 160
        assert values["model"]["name"] == "tiny-random" and values["train"]["max_steps"] == 8
    finally:
        page.close()
        assert notebook.read_bytes() == committed, "JupyterLab wrote into the committed notebook"

    out = tmp_path / "make-outputs"
    try:
        proc = run_make("run", f"EXP={SAVED}", f"OUTPUTS={out}")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        _stop_training_from_the_live_view(browser, url, token, out, artifacts)
    finally:
        saved.unlink(missing_ok=True)
    run = out / SAVED
    assert json.loads((run / "metrics" / "01_data_prep.json").read_text())["rows_in"] > 0

    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    for stage, title in STAGES.items():
        page.goto((run / "reports" / f"{stage}.html").as_uri())
        assert title in page.locator("h1").first.text_content(), stage
        assert page.locator("table").count() >= 1, stage
        if stage in ("01_data_prep", "03_train", "04_evaluate"):
            assert page.locator("img").count() >= 1, f"{stage}: no figure"
            for img in page.locator("img").all():  # every figure decoded (embedded, not a broken link)
                assert img.evaluate("e => e.complete && e.naturalWidth > 0"), stage
        assert page.locator("[data-mime-type*='stderr'], .output_stderr").count() == 0, f"{stage}: log output"
        _no_error_output(page)
        page.screenshot(path=str(artifacts / f"report-{stage}.png"), full_page=True)
    page.goto((run / "index.html").as_uri())
    links = [a.get_attribute("href") for a in page.locator("a").all()]
    assert all(f"reports/{s}.html" in links for s in STAGES), links
    assert page.locator("table").count() >= 1
    page.screenshot(path=str(artifacts / "index.png"), full_page=True)
    page.close()


def _stop_training_from_the_live_view(browser, url, token, out, artifacts):
    """03_train on the saved experiment, made long enough to stop while it trains: the notebook's
    Interrupt button ends training with a checkpoint, the later cells run, and the report says where."""
    notebook = ROOT / "notebooks" / "03_train.ipynb"
    committed = notebook.read_bytes()
    lab_out = out / "lab"
    import shutil as _shutil

    _shutil.copytree(out / SAVED, lab_out / SAVED)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(f"{url}/lab/workspaces/stop/tree/notebooks/03_train.ipynb?reset&token={token}")
        page.wait_for_selector(".jp-StatusBar-TextItem:has-text('| Idle')", timeout=120_000)
        _new_cell_after_parameters(page)
        page.keyboard.insert_text(f'experiment = "{SAVED}"\noutputs_dir = "{lab_out}"\n'
                                  'overrides = {"train.max_steps": 2000, "train.eval_steps": 0}')
        page.keyboard.press("Escape")
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
        stats = page.locator(".ftkit-live-stats")
        stats.wait_for(timeout=180_000)
        page.wait_for_function("() => { const e = document.querySelector('.ftkit-live-stats');"
                               " const m = e && e.textContent.match(/step (\\d+)\\//); return m && +m[1] >= 5; }",
                               timeout=180_000, polling=250)
        stats.scroll_into_view_if_needed()
        page.screenshot(path=str(artifacts / "03-live-view.png"))
        # Stop: the notebook's own Interrupt button, which ftkit turns into a clean stop at the next step
        page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) [data-jp-item-name='interrupt']").first.click()
        page.wait_for_function(ALL_RAN, timeout=300_000, polling=500)
        _no_error_output(page)
        stopped = page.locator(".jp-OutputArea-output:has-text('by request at step')")
        assert stopped.count() >= 1
        page.screenshot(path=str(artifacts / "03-stopped.png"))
        metrics = json.loads((lab_out / SAVED / "metrics" / "03_train.json").read_text())
        assert metrics["planned_steps"] == 2000 and 5 <= metrics["stopped_at_step"] < 2000
        step = metrics["stopped_at_step"]
        assert (lab_out / SAVED / "checkpoints" / f"checkpoint-{step}" / "ftkit_checkpoint_complete.json").exists()
    finally:
        page.close()
        assert notebook.read_bytes() == committed, "JupyterLab wrote into the committed notebook"
