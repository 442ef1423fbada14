"""Experiments side by side (``ftkit compare A B …``, ``make compare EXPS="a b"``): one HTML page with the
config keys whose values differ between the runs (read from each run's ``config.json``, written by stage 01)
and every headline figure of :mod:`ftkit.report.overview`, stage 04's with their bootstrap intervals."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ftkit.core.files import read_json
from ftkit.core.paths import RunPaths
from ftkit.report.overview import Figure, cell_class, esc, fmt_figure, page, stage_views, write_page

# experiment differs in every comparison and already heads each column; outputs_dir is where a
# machine keeps its runs, not a setting of the experiment (and an absolute path of that machine)
SAME_BY_NAME = {"experiment", "outputs_dir"}


def default_output(outputs_dir: str | Path, experiments: list[str]) -> Path:
    return Path(outputs_dir) / f"compare-{'-'.join(experiments)}.html"


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """Nested config sections as dotted keys (``train.lora.r``); lists stay whole values."""
    out: dict[str, object] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


MISSING = object()


def config_differences(configs: dict[str, dict]) -> list[tuple[str, list[object]]]:
    """``(dotted key, value per run)`` for every key whose value is not the same in all runs (a key one run
    lacks counts as different), in the order the first run lists them."""
    flat = {name: flatten(c) for name, c in configs.items()}
    keys = list(dict.fromkeys(k for f in flat.values() for k in f))
    rows = []
    for k in keys:
        if k in SAME_BY_NAME:
            continue
        values = [f.get(k, MISSING) for f in flat.values()]
        if any(v != values[0] for v in values[1:]):
            rows.append((k, values))
    return rows


def shown_value(value: object, outputs_dir: Path) -> str:
    """A config value as the page shows it: paths below the outputs folder, the project or the home folder
    are written relative to them, so the page names no folder of this machine."""
    if value is MISSING:
        return "(not set)"
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    for base, shown in ((outputs_dir, "<outputs>"), (Path.cwd(), "."), (Path.home(), "~")):
        base_text = str(base.resolve())
        if base_text != "/":
            text = text.replace(base_text, shown)
    return text


def _config_table(outputs_dir: Path, names: list[str]) -> str:
    configs, missing = {}, []
    for name in names:
        record = RunPaths(outputs_dir, name).config_record
        if record.exists():
            configs[name] = read_json(record)
        else:
            missing.append(name)
    parts = ["<h2>Config: the keys that differ</h2>"]
    if missing:
        parts.append(f'<p class="notrun">No config record (stage 01 writes config.json) for: {esc(", ".join(missing))}; '
                     "left out of this table.</p>")
    if len(configs) < 2:
        parts.append("<p>Fewer than two runs with a config record: nothing to compare.</p>")
        return "\n".join(parts)
    rows = config_differences(configs)
    if not rows:
        parts.append("<p>Every key has the same value in all runs.</p>")
        return "\n".join(parts)
    head = "".join(f"<th>{esc(n)}</th>" for n in configs)
    body = "\n".join(f"<tr><td><code>{esc(k)}</code></td>"
                     + "".join(f"<td>{esc(shown_value(v, outputs_dir))}</td>" for v in values) + "</tr>"
                     for k, values in rows)
    parts.append(f"<table>\n<tr><th>key</th>{head}</tr>\n{body}\n</table>")
    return "\n".join(parts)


def _figures_table(outputs_dir: Path, names: list[str]) -> str:
    """A row per headline figure (the union over the runs, in stage order), a column per run; stage 04's
    figures carry their bootstrap interval as ``value [low, high]``."""
    per_run: dict[str, dict[str, Figure]] = {}
    order: dict[str, str] = {}
    for name in names:
        figures = [f for v in stage_views(RunPaths(outputs_dir, name)) for f in v.figures]
        per_run[name] = {f.key: f for f in figures}
        for f in figures:
            order.setdefault(f.key, f.label)
    head = "".join(f"<th>{esc(n)}</th>" for n in names)
    rows = []
    for key, label in sorted(order.items(), key=lambda kv: kv[0][:2]):  # stable: stage, then first seen
        figures = [per_run[n].get(key) for n in names]
        shown = [fmt_figure(f) if f else "not run" for f in figures]
        cells = "".join(f'<td class="{cell_class(f.value) if f else "text"}">{esc(t)}</td>'
                        for f, t in zip(figures, shown, strict=True))
        differs = ' class="differs"' if len(set(shown)) > 1 else ""
        rows.append(f"<tr{differs}><td>{esc(key[:2])} {esc(label)}</td>{cells}</tr>")
    return (f"<h2>Metrics</h2>\n<p>Stage 04's values carry their bootstrap interval: value [low, high]. "
            "Rows that differ between the runs are shaded.</p>\n"
            f"<table>\n<tr><th>figure</th>{head}</tr>\n" + "\n".join(rows) + "\n</table>")


def comparison_html(outputs_dir: str | Path, names: list[str], page_dir: str | Path) -> str:
    """The page for runs ``names`` under ``outputs_dir``; links are relative to ``page_dir``, where it goes."""
    outputs_dir = Path(outputs_dir)
    links = []
    for name in names:
        index = RunPaths(outputs_dir, name).root / "index.html"
        href = os.path.relpath(index, Path(page_dir)).replace(os.sep, "/")
        links.append(f'<li><a href="{esc(href)}">{esc(name)}</a></li>' if index.exists() else f"<li>{esc(name)} "
                     '<span class="muted">(no index.html: ftkit index)</span></li>')
    body = [f"<h1>Compared: {esc(', '.join(names))}</h1>", "<ul>\n" + "\n".join(links) + "\n</ul>",
            _config_table(outputs_dir, names), _figures_table(outputs_dir, names)]
    return page(f"ftkit: {' vs '.join(names)}", "\n".join(body))


def write_comparison(outputs_dir: str | Path, names: list[str], output: str | Path | None = None) -> Path:
    """Write the comparison page (default ``<outputs>/compare-a-b.html``) and return its path."""
    missing = [n for n in names if not RunPaths(outputs_dir, n).root.is_dir()]
    if missing:
        raise FileNotFoundError(f"no run folder under {outputs_dir} for: {', '.join(missing)}")
    path = Path(output) if output else default_output(outputs_dir, names)
    write_page(path, comparison_html(outputs_dir, names, path.parent))
    return path
