"""A run at a glance: ``outputs/<exp>/index.html`` links the five stage reports and shows each stage's
headline figures, read from ``metrics/NN_stage.json`` (a stage not run yet says so), and the same figures
as a few terminal lines (``ftkit index``, the end of ``make run``).

The pages built here (and by :mod:`ftkit.report.compare`) are one HTML file with inline CSS, no script
and no external resource, showing only file names or paths relative to the run, so they can be mailed.
"""

from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ftkit.core.files import atomic
from ftkit.core.paths import STAGES, RunPaths
from ftkit.evaluate.scoring import HEADLINE, LOWER_IS_BETTER, MODELS, NAMES

TITLES = {"01_data_prep": "Data preparation", "02_format_conversion": "Format conversion", "03_train": "Training",
          "04_evaluate": "Evaluation", "05_host": "Hosting"}
PAIRS = ("tuned_vs_prompted", "tuned_vs_base")  # the differences report 04's verdict is written from


@dataclass(frozen=True)
class Figure:
    """One headline number of a stage. ``key`` is the same in every run, so runs line up on it (compare)."""

    key: str
    label: str
    value: object
    ci: tuple[float, float] | None = None  # the bootstrap interval, where stage 04 computed one
    href: str | None = None  # a file of the run it names, relative to the run's folder


@dataclass
class StageView:
    """What the index shows of one stage: whether it ran, its report, its figures and sentences."""

    stage: str
    ran: bool  # its metrics file exists
    report: str | None  # its HTML report relative to the run's folder, when one was rendered
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # stage 04's verdict, in its own words


def stage_views(paths: RunPaths) -> list[StageView]:
    """The five stages of ``paths``' run, in order, with the figures of those that wrote their metrics."""
    views = []
    for stage in STAGES:
        report = paths.reports_dir / f"{stage}.html"
        view = StageView(stage, paths.metrics(stage).exists(),
                         report.relative_to(paths.root).as_posix() if report.exists() else None)
        if view.ran:
            metrics = paths.read_metrics(stage)
            view.figures = FIGURES[stage](metrics)
            view.notes = list(metrics.get("verdict") or []) if stage == "04_evaluate" else []
        views.append(view)
    return views


def _data(m: dict) -> list[Figure]:
    return [Figure("01.rows_in", "rows read", m["rows_in"]), Figure("01.rows_kept", "rows kept", m["rows_kept"]),
            Figure("01.rows_quarantined", "rows quarantined", m["rows_quarantined"]),
            *(Figure(f"01.conversations.{k}", f"{k} conversations", v) for k, v in m["conversations"].items())]


def _convert(m: dict) -> list[Figure]:
    train = m["token_stats"]["train"]
    return [Figure("02.train_examples", "training examples", train["examples"]),
            Figure("02.trained_tokens", "trained tokens per epoch (assistant replies)", train["trained_tokens"]),
            Figure("02.tokens", "tokens per epoch (all)", train["tokens"])]


def _train(m: dict) -> list[Figure]:
    return [Figure("03.method", "method", m.get("method")), Figure("03.steps", "steps", m.get("steps")),
            Figure("03.train_tokens", "tokens trained on", m.get("train_tokens")),
            Figure("03.train_loss_last", "final train loss", m.get("train_loss_last")),
            Figure("03.eval_loss", "final validation loss", m.get("eval_loss"))]


def _evaluate(m: dict) -> list[Figure]:
    """Each headline metric for base, prompted and tuned (value and interval), then the paired differences."""
    out = []
    for k in HEADLINE:
        name = NAMES[k] + (" (lower is better)" if k in LOWER_IS_BETTER else "")
        for model in (x for x in MODELS if x in m and m[x].get(k) is not None):
            ci = m[model].get("ci", {}).get(k)
            out.append(Figure(f"04.{model}.{k}", f"{name}: {model}", m[model][k],
                              (ci["ci_low"], ci["ci_high"]) if ci else None))
        for pair in PAIRS:
            d = m.get("deltas", {}).get(pair, {}).get(k)
            if d is not None:
                out.append(Figure(f"04.{pair}.{k}", f"{name}: {pair.replace('_vs_', ' - ')}", d["delta"],
                                  (d["ci_low"], d["ci_high"])))
    out += [Figure(f"04.verdict.{pair}", f"verdict, {pair.replace('_vs_', ' vs ')}", verdict_counts(m, pair))
            for pair in PAIRS if pair in m.get("deltas", {})]
    return out


def verdict_counts(m: dict, pair: str = "tuned_vs_prompted") -> str:
    """Report 04's verdict in one line: on how many headline metrics the tuned model is ahead, behind, or not
    clearly different (the interval of the paired difference holds zero), as its verdict sentences say."""
    ahead = behind = unclear = 0
    for k in HEADLINE:
        d = m.get("deltas", {}).get(pair, {}).get(k)
        if d is None:
            continue
        better = -d["delta"] if k in LOWER_IS_BETTER else d["delta"]
        if d["ci_low"] > 0 or d["ci_high"] < 0:
            ahead, behind = ahead + (better > 0), behind + (better <= 0)
        else:
            unclear += 1
    level = round(100 * m.get("confidence", 0.95))
    return f"ahead on {ahead}, behind on {behind}, no clear difference on {unclear} ({level}% CI)"


def _host(m: dict) -> list[Figure]:
    out = [Figure("05.merge_check_passed", "merge check passed", m.get("merge_check_passed")),
           Figure("05.consistency_passed", "train/serve check passed", m.get("consistency_passed"))]
    load = m.get("load") or []
    if load:
        one, most = load[0], load[-1]
        out += [Figure("05.ttft_median_s", f"time to first token, median (s, {one['concurrency']} client)",
                       one["ttft_median_s"]),
                Figure("05.tokens_per_s_per_request", f"tokens/s per request ({one['concurrency']} client)",
                       one["tokens_per_s_per_request"]),
                Figure("05.tokens_per_s_total", f"tokens/s, all clients ({most['concurrency']} clients)",
                       most["tokens_per_s_total"])]
    for g in m.get("gguf") or []:  # stage 05 records absolute paths; the page names the file in exports/
        name = Path(g["path"]).name
        out.append(Figure(f"05.gguf.{g['type']}", f"export {g['type']} (MB)", g["bytes"] / 1e6,
                          href=f"exports/{name}"))
    if not m.get("gguf"):
        out.append(Figure("05.gguf", "GGUF export", _no_export(m)))
    return out


def _no_export(m: dict) -> str:
    """Why stage 05 wrote no GGUF file, in its own words."""
    skipped = "; ".join(f"{s['type']}: {s['reason']}" for s in m.get("gguf_skipped") or [])
    return m.get("gguf_note") or (f"none ({skipped})" if skipped else "none (host.gguf_types is empty)")


FIGURES = {"01_data_prep": _data, "02_format_conversion": _convert, "03_train": _train, "04_evaluate": _evaluate,
           "05_host": _host}


def fmt(value) -> str:
    """A figure as text: thousands separated, four significant digits, yes/no, a dash for none."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.4g}" if value == 0 or abs(value) >= 1e-3 else f"{value:.2e}"
    return str(value)


def fmt_figure(f: Figure) -> str:
    return fmt(f.value) + (f" [{fmt(f.ci[0])}, {fmt(f.ci[1])}]" if f.ci else "")


def cell_class(value) -> str:
    """Numbers right-aligned, words left."""
    return "num" if isinstance(value, (int, float)) and not isinstance(value, bool) else "text"


def esc(text) -> str:
    return html.escape(str(text), quote=True)


CSS = """body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:64rem;margin:2rem auto;
padding:0 1rem;color:#222;line-height:1.45}h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0}th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:left;
vertical-align:top}th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#777}.notrun{color:#a60}tr.differs td{background:#fff6dd}"""


def page(title: str, body: str) -> str:
    """A whole HTML document: inline style, no script, no link to anything outside the file."""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{esc(title)}</title>\n'
            f"<style>\n{CSS}\n</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def _figure_rows(figures: list[Figure]) -> str:
    rows = []
    for f in figures:
        value = esc(fmt_figure(f))
        if f.href:
            value = f'<a href="{esc(f.href)}">{value}</a>'
        rows.append(f'<tr><td>{esc(f.label)}</td><td class="{cell_class(f.value)}">{value}</td></tr>')
    return "<table>\n" + "\n".join(rows) + "\n</table>"


def _evaluation_table(figures: list[Figure]) -> str:
    """Stage 04 as report 04 lays it out: a row per metric, a column per model and per paired difference."""
    columns = [c for c in (*MODELS, *PAIRS) if any(f.key.startswith(f"04.{c}.") for f in figures)]
    by_key = {f.key: f for f in figures}
    head = "".join(f"<th>{esc(c.replace('_vs_', ' - '))}</th>" for c in columns)
    rows = []
    for k in HEADLINE:
        cells = [by_key.get(f"04.{c}.{k}") for c in columns]
        if any(cells):
            name = NAMES[k] + (" (lower is better)" if k in LOWER_IS_BETTER else "")
            rows.append(f"<tr><td>{esc(name)}</td>" + "".join(
                f'<td class="num">{esc(fmt_figure(f)) if f else "–"}</td>' for f in cells) + "</tr>")
    verdicts = [f for f in figures if f.key.startswith("04.verdict.")]
    return (f"<table>\n<tr><th>metric</th>{head}</tr>\n" + "\n".join(rows) + "\n</table>\n"
            + "".join(f"<p><b>{esc(f.label)}</b>: {esc(f.value)}</p>\n" for f in verdicts))


def index_html(experiment: str, views: list[StageView]) -> str:
    """The index page of one run: a section per stage, linking its report, with its figures or "not run"."""
    ran = sum(v.ran for v in views)
    parts = [f"<h1>{esc(experiment)}</h1>", f"<p>{ran} of {len(views)} stages run. Each report is a single file; "
             "links are relative to this page's folder.</p>"]
    for v in views:
        number, _, _ = v.stage.partition("_")
        parts.append(f"<h2>{number} · {esc(TITLES[v.stage])}</h2>")
        if v.report:
            parts.append(f'<p>Report: <a href="{esc(v.report)}">{esc(v.report)}</a></p>')
        elif v.ran:
            parts.append('<p class="muted">Metrics written; no HTML report (run without papermill).</p>')
        if not v.ran:
            parts.append('<p class="notrun">not run</p>')
            continue
        if v.stage == "04_evaluate":
            parts.append(_evaluation_table(v.figures))
            if v.notes:
                parts.append("<p>Verdict:</p>\n<ul>\n" + "\n".join(f"<li>{esc(s)}</li>" for s in v.notes) + "\n</ul>")
        else:
            parts.append(_figure_rows(v.figures))
    return page(f"{experiment}: ftkit run", "\n".join(parts))


def write_index(paths: RunPaths) -> Path:
    """Write ``outputs/<exp>/index.html`` (atomically) and return its path."""
    path = paths.root / "index.html"
    write_page(path, index_html(paths.experiment, stage_views(paths)))
    return path


def write_page(path: Path, text: str) -> None:
    """Write a page atomically, readable by others like the reports nbconvert writes (a temporary file is
    private to its owner until renamed)."""
    with atomic(Path(path)) as tmp:
        tmp.write_text(text, encoding="utf-8")
        tmp.chmod(0o644)


def terminal_path(path: Path, start: Path | None = None) -> str:
    """``path`` for the terminal: relative to ``start`` (default: the working directory, where make runs)
    when it lies below it, else as it is (a path to open, not one in a page to mail)."""
    path, start = Path(path).resolve(), (start or Path.cwd()).resolve()
    return os.path.relpath(path, start) if path.is_relative_to(start) else str(path)


def summary_lines(paths: RunPaths, index: Path) -> list[str]:
    """A handful of terminal lines: where the reports and the index are, and the headline figures."""
    views = stage_views(paths)
    figures = {f.key: f for v in views for f in v.figures}
    done = {v.stage[:2] for v in views if v.ran}

    def val(key):
        return fmt(figures[key].value) if key in figures else "-"

    lines = [f"{paths.experiment}: stages {', '.join(sorted(done)) or 'none'} run; reports in "
             f"{terminal_path(paths.reports_dir)}/", f"index: {terminal_path(index)}"]
    if "01" in done:
        lines.append(f"01 data: {val('01.rows_kept')} rows kept, {val('01.rows_quarantined')} quarantined")
    if done & {"02", "03"}:
        lines.append(f"02/03 tokens: {val('02.trained_tokens')} trained per epoch; {val('03.train_tokens')} trained "
                     f"on in {val('03.steps')} steps")
    if "03" in done:
        lines.append(f"03 train: final train loss {val('03.train_loss_last')}, validation loss {val('03.eval_loss')}")
    if "04" in done:
        losses = ", ".join(f"{m} {val(f'04.{m}.loss')}" for m in MODELS if f"04.{m}.loss" in figures)
        lines.append(f"04 evaluate: held-out loss {losses}; tuned vs prompted: {val('04.verdict.tuned_vs_prompted')}")
    if "05" in done:
        exports = [Path(f.href).name for f in figures.values() if f.key.startswith("05.gguf.")]
        lines.append(f"05 host: time to first token {val('05.ttft_median_s')} s, {val('05.tokens_per_s_per_request')} "
                     f"tokens/s (one client); exports: {', '.join(exports) or val('05.gguf')}")
    return lines
