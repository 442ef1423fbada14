"""The run's pages as a reader gets them: index.html (the five reports and their headline figures), the
comparison page, and every HTML file a single mailable file (nothing fetched from elsewhere, no log
output, no folder of this machine, no glyph a common font lacks). Reads the session's smoke run."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import ROOT, run_make

STAGES = ["01_data_prep", "02_format_conversion", "03_train", "04_evaluate", "05_host"]
FTKIT = str(ROOT / ".venv" / "bin" / "ftkit")

# Latin-1 and the few characters every common font has: typographic punctuation, a minus, a Delta and the
# four plain arrows (report 04's notebook text marks lower-is-better with a down arrow)
ALLOWED_EXTRA = set("–—‘’“”„…•·×≤≥±−≈≠€ΔΔ←↑→↓")


class Page(HTMLParser):
    """What the checks need from an HTML file: links and sources of tags, table rows, the visible text."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.refs: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.mime_types: list[str] = []  # of the notebook's outputs (data-mime-type)
        self.rows: list[list[str]] = []
        self.text: list[str] = []
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.refs += [(tag, k, v or "") for k, v in attrs if k in ("src", "href", "data", "poster", "srcset")]
        self.mime_types += [v or "" for k, v in attrs if k == "data-mime-type"]
        if tag == "tr":
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def row(self, label: str) -> list[str]:
        found = [r[1:] for r in self.rows if r and r[0] == label]
        assert found, f"no row {label!r} in {[r[0] for r in self.rows if r]}"
        return found[0]


def _page(path: Path) -> Page:
    return Page(path.read_text(encoding="utf-8"))


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def _close(shown: str, value: float) -> bool:
    """A figure shown to four significant digits equals the metrics file's value."""
    return abs(_number(shown) - value) <= 5e-4 * max(abs(value), 1e-12) + 1e-12


def _value_ci(shown: str) -> tuple[float, float, float]:
    m = re.fullmatch(r"(\S+) \[(\S+), (\S+)\]", shown)
    assert m, shown
    return _number(m[1]), _number(m[2]), _number(m[3])


def _metrics(run: Path, stage: str) -> dict:
    return json.loads((run / "metrics" / f"{stage}.json").read_text())


def test_index_links_the_five_reports(smoke):
    index = smoke / "index.html"
    hrefs = [v for tag, k, v in _page(index).refs if tag == "a" and k == "href"]
    for stage in STAGES:
        assert f"reports/{stage}.html" in hrefs
        assert (index.parent / f"reports/{stage}.html").is_file()
    for href in hrefs:  # every link on the page opens a file of the run
        assert not href.startswith(("/", "http:", "https:")) and (index.parent / href).exists(), href


def test_index_shows_the_metrics_files_figures(smoke):
    page = _page(smoke / "index.html")
    m1, m2, m3 = (_metrics(smoke, s) for s in STAGES[:3])
    assert page.row("rows kept") == [f"{m1['rows_kept']:,}"]
    assert page.row("rows quarantined") == [f"{m1['rows_quarantined']:,}"]
    assert page.row("trained tokens per epoch (assistant replies)") == [f"{m2['token_stats']['train']['trained_tokens']:,}"]
    assert page.row("tokens trained on") == [f"{m3['train_tokens']:,}"]
    assert _close(page.row("final train loss")[0], m3["train_loss_last"])
    assert _close(page.row("final validation loss")[0], m3["eval_loss"])

    m4 = _metrics(smoke, "04_evaluate")
    header = next(r for r in page.rows if r and r[0] == "metric")
    loss = dict(zip(header[1:], page.row("held-out loss (lower is better)"), strict=True))
    for model in ("base", "prompted", "tuned"):
        value, low, high = _value_ci(loss[model])
        ci = m4[model]["ci"]["loss"]
        assert _close(str(value), m4[model]["loss"])
        assert _close(str(low), ci["ci_low"]) and _close(str(high), ci["ci_high"])
    delta = m4["deltas"]["tuned_vs_prompted"]["loss"]
    assert all(_close(str(x), y) for x, y in zip(_value_ci(loss["tuned - prompted"]),
                                                 (delta["delta"], delta["ci_low"], delta["ci_high"]), strict=True))
    text = " ".join("".join(page.text).split())
    assert m4["verdict"] and all(" ".join(s.split()) in text for s in m4["verdict"])  # the report's verdict, whole

    m5 = _metrics(smoke, "05_host")
    assert _close(page.row("time to first token, median (s, 1 client)")[0], m5["load"][0]["ttft_median_s"])
    assert _close(page.row("tokens/s per request (1 client)")[0], m5["load"][0]["tokens_per_s_per_request"])
    if m5["gguf"]:  # with llama.cpp's converter fetched (make thirdparty)
        for g in m5["gguf"]:
            assert f"exports/{Path(g['path']).name}" in [v for _, _, v in page.refs]
    else:
        assert page.row("GGUF export")[0] == " ".join((m5.get("gguf_note") or "none").split())


def test_make_run_ends_with_the_summary(smoke_make):
    run, stdout, _ = smoke_make
    m1, m3 = _metrics(run, "01_data_prep"), _metrics(run, "03_train")
    tail = stdout.strip().splitlines()[-8:]
    assert any(line.startswith("index: ") and line.endswith("smoke/index.html") for line in tail), tail
    assert f"01 data: {m1['rows_kept']:,} rows kept, {m1['rows_quarantined']:,} quarantined" in tail
    assert any(line.startswith("03 train: final train loss") for line in tail) and m3["steps"] == 8


def test_index_says_which_stages_did_not_run(smoke, tmp_path):
    run = tmp_path / "early"
    shutil.copytree(smoke / "metrics", run / "metrics")
    for stage in STAGES[2:]:
        (run / "metrics" / f"{stage}.json").unlink()
    proc = subprocess.run([FTKIT, "index", "early", "--outputs-dir", str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    page = (run / "index.html").read_text(encoding="utf-8")
    assert page.count('class="notrun">not run<') == 3
    assert "Metrics written; no HTML report" in page and 'href="reports/' not in page  # ftkit run: no reports
    assert "stages 01, 02 run" in proc.stdout


def _second_run(smoke: Path, outputs: Path) -> None:
    """The smoke run twice under ``outputs``: as it is, and as "smoke-lr" with another learning rate in its
    config record and a tuned loss a little lower (what a second run would change)."""
    for name in ("smoke", "smoke-lr"):
        (outputs / name).mkdir(parents=True)
        for part in ("metrics", "reports", "config.json", "index.html"):
            (shutil.copytree if (smoke / part).is_dir() else shutil.copy)(smoke / part, outputs / name / part)
    record = outputs / "smoke-lr" / "config.json"
    config = json.loads(record.read_text())
    config["experiment"], config["train"]["learning_rate"] = "smoke-lr", 2e-3
    record.write_text(json.dumps(config))
    m4 = outputs / "smoke-lr" / "metrics" / "04_evaluate.json"
    m = json.loads(m4.read_text())
    m["tuned"]["loss"] -= 0.5
    m4.write_text(json.dumps(m))


def test_compare_shows_the_differing_keys_only(smoke, tmp_path):
    _second_run(smoke, tmp_path)
    proc = run_make("compare", "EXPS=smoke smoke-lr", f"OUTPUTS={tmp_path}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    page = _page(tmp_path / "compare-smoke-smoke-lr.html")
    config = json.loads((smoke / "config.json").read_text())
    assert page.row("train.learning_rate") == [str(config["train"]["learning_rate"]), "0.002"]
    keys = [r[0] for r in page.rows if r and "." in r[0] and not r[0][:2].isdigit()]
    assert keys == ["train.learning_rate"], keys  # model.name, train.max_steps... are equal: not shown

    m4 = _metrics(smoke, "04_evaluate")
    smoke_cell, lr_cell = page.row("04 held-out loss (lower is better): tuned")
    value, low, high = _value_ci(smoke_cell)
    assert _close(str(value), m4["tuned"]["loss"]) and _close(str(low), m4["tuned"]["ci"]["loss"]["ci_low"])
    assert _close(str(high), m4["tuned"]["ci"]["loss"]["ci_high"])
    assert _close(lr_cell.split()[0], m4["tuned"]["loss"] - 0.5)
    assert page.row("01 rows kept") == [f"{_metrics(smoke, '01_data_prep')['rows_kept']:,}"] * 2
    text = (tmp_path / "compare-smoke-smoke-lr.html").read_text(encoding="utf-8")
    assert '<tr class="differs"><td>04 held-out loss (lower is better): tuned<' in text  # shaded
    assert "<tr><td>01 rows kept<" in text
    hrefs = [v for tag, k, v in page.refs if tag == "a"]
    assert hrefs == ["smoke/index.html", "smoke-lr/index.html"]

    out = tmp_path / "elsewhere" / "both.html"
    proc = subprocess.run([FTKIT, "compare", "smoke", "smoke-lr", "--outputs-dir", str(tmp_path), "-o", str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and out.is_file(), proc.stderr
    assert [v for tag, k, v in _page(out).refs if tag == "a"] == ["../smoke/index.html", "../smoke-lr/index.html"]
    _assert_mailable(out, [tmp_path])


# --- every HTML page can be mailed -------------------------------------------------------------------------

REMOTE = re.compile(r"^\s*(https?:)?//", re.I)
CSS_REMOTE = re.compile(r"""(@import\s+['"]?\s*(https?:)?//|url\(\s*['"]?\s*(https?:)?//)""", re.I)
DATA_URI = re.compile(r"data:[\w/+.-]+;base64,[A-Za-z0-9+/=\s]+")


def mailable_problems(path: Path, folders: list[Path]) -> list[str]:
    """Why ``path`` is not one self-contained file a reader can open anywhere: a tag loading something from
    the network, a log line in the report, a folder of this machine, a character outside ALLOWED_EXTRA."""
    text = path.read_text(encoding="utf-8")
    page = Page(text)
    problems = [f"{tag} {attr}={value[:80]}" for tag, attr, value in page.refs if tag != "a" and REMOTE.match(value)]
    problems += [f"CSS loads {m[0]}" for m in CSS_REMOTE.finditer(text)]
    problems += ["stderr output" for t in page.mime_types if t == "application/vnd.jupyter.stderr"]
    problems += ["a widget (progress bar)"] * text.count('type="application/vnd.jupyter.widget-view+json"')
    plain = html.unescape(DATA_URI.sub("data:", text))  # base64 may spell anything
    for folder in folders:
        for shown in {str(folder), str(folder.resolve())}:
            problems += [f"path {plain[i:i + 80]!r}" for i in _find_all(plain, shown)]
    problems += [f"character {c!r} (U+{ord(c):04X}) in {plain[max(0, i - 40):i + 20]!r}"
                 for i, c in enumerate(plain) if ord(c) > 0xFF and c not in ALLOWED_EXTRA]
    return problems


def _find_all(text: str, needle: str) -> list[int]:
    return [m.start() for m in re.finditer(re.escape(needle) + r"(?![\w-])", text)]


def _machine_folders(outputs: Path) -> list[Path]:
    return [outputs, ROOT, Path.home(), Path(os.environ.get("TMPDIR", "/tmp"))]


def _assert_mailable(path: Path, outputs: list[Path]):
    problems = mailable_problems(path, [f for o in outputs for f in _machine_folders(o)])
    assert not problems, f"{path.name}: {problems[:10]}"


@pytest.mark.parametrize("page", [f"reports/{s}.html" for s in STAGES] + ["index.html"])
def test_every_page_is_one_mailable_file(smoke, page):
    _assert_mailable(smoke / page, [smoke.parent])
    images = [v for tag, k, v in _page(smoke / page).refs if tag == "img"]
    assert all(v.startswith("data:image/") for v in images), [v[:60] for v in images]  # embedded, not files beside it
    if page.startswith("reports/"):
        assert images  # every report has plots


def test_executed_notebooks_hold_no_log_output(smoke):
    """The source of the reports: no cell wrote to stderr or showed a progress bar."""
    noise = []
    for stage in STAGES:
        for k, cell in enumerate(json.loads((smoke / "reports" / f"{stage}.ipynb").read_text())["cells"]):
            for out in cell.get("outputs", []):
                if out.get("name") == "stderr" or "application/vnd.jupyter.widget-view+json" in out.get("data", {}):
                    noise.append(f"{stage} cell {k}: {str(out.get('text') or out.get('data'))[:120]}")
    assert not noise, noise


def test_the_checks_catch_a_bad_page(tmp_path):
    """Each check fails on a page that breaks it (so a pass above means something)."""
    folder = tmp_path / "run"
    bad = tmp_path / "bad.html"
    bad.write_text('<html><head><script src="https://cdn.example/x.js"></script><style>@import url(//cdn.example/a.css);'
                   '</style><link rel="stylesheet" href="http://cdn.example/b.css"></head><body><img src="https://x/y.png">'
                   f'<div data-mime-type="application/vnd.jupyter.stderr"><pre>WARNING x</pre></div><p>{folder}/merged '
                   '✅ PASS</p><p>plain link: <a href="https://example.org">fine</a></p></body></html>', encoding="utf-8")
    problems = mailable_problems(bad, [folder])
    kinds = [p.split()[0] for p in problems]
    assert kinds.count("script") == kinds.count("link") == kinds.count("img") == 1, problems
    assert kinds.count("CSS") == 1 and "stderr output" in problems and kinds.count("path") == 1, problems
    assert any(p.startswith("character '✅'") for p in problems) and not any("example.org" in p for p in problems)
    good = tmp_path / "good.html"
    good.write_text('<p>loss 2.999 → 0.025 — “tuned” ± 0.1 <a href="https://example.org">docs</a> '
                    '<img src="data:image/png;base64,AAAA/tmp/run/AAAA"></p>', encoding="utf-8")
    assert mailable_problems(good, [Path("/tmp/run")]) == []
