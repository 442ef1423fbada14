"""The hyperparameter form: ipywidgets generated from the config dataclasses themselves.

Each field's type picks its widget (``Literal`` a dropdown, ``bool`` a checkbox, a number with a
``slider`` hint in its field metadata a slider, the learning rate a log-scale slider, paths a text
box with a file check, anything else YAML text), its attribute docstring is its help, and every
change is validated by :func:`ftkit.load_config` itself, so the form accepts exactly what a
parameters file accepts; an error is shown beside the field it names. **Save** writes
``parameters/<name>.yaml`` with only the values that differ from the defaults: ``make run
EXP=<name>`` runs it unchanged.
"""

from __future__ import annotations

import dataclasses
import html
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from ftkit.core.config import DEMO_DATA, DEMO_PREFERENCE_DATA, ConfigError, ExperimentConfig, load_config
from ftkit.core.config_reference import attribute_docs
from ftkit.core.session import project_root

SAVED_HEADER = "# Saved by the ftkit notebook form: only the values that differ from the defaults.\n"
STAGE_SECTIONS = {"01_data_prep": "data", "02_format_conversion": "convert", "03_train": "train",
                  "04_evaluate": "evaluate", "05_host": "host"}
_FIELD_IN_ERROR = re.compile(r"^(?:overrides\.)?([a-z_]+(?:\.[a-z_]+)*)\s*[:=]")


@dataclasses.dataclass
class Field:
    """One config key: where it lives, its type, its default and its help text."""

    key: str  # dotted, e.g. train.lora.r
    hint: Any
    default: Any
    doc: str
    metadata: dict

    @property
    def name(self) -> str:
        return self.key.rsplit(".", 1)[-1]

    @property
    def is_path(self) -> bool:
        return self.name == "path" or self.name.endswith("_path") or self.key == "train.accelerate_config"


def config_fields(cls=ExperimentConfig, prefix: str = "") -> list[Field]:
    """Every leaf key of ``cls``, depth first, in declaration order; not secrets (a key typed into a form
    would be saved with it: they come from the environment or a notebook cell)."""
    hints, docs = typing.get_type_hints(cls), attribute_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if f.metadata.get("secret"):
            continue
        if dataclasses.is_dataclass(hint):
            out.extend(config_fields(hint, f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append(Field(f"{prefix}{f.name}", hint, default, " ".join(docs.get(f.name, "").split()), dict(f.metadata)))
    return out


def _get(tree: dict, key: str) -> Any:
    for part in key.split("."):
        tree = tree[part]
    return tree


def _set(tree: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def _optional(hint) -> tuple[Any, bool]:
    """(the type inside ``X | None``, whether None is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else hint), type(None) in typing.get_args(hint)
    return hint, False


def differences(cfg: ExperimentConfig) -> dict:
    """The nested mapping of the values of ``cfg`` that differ from the defaults (what a parameters
    file needs to hold to reproduce ``cfg``)."""
    values, defaults = cfg.to_dict(), ExperimentConfig().to_dict()
    out: dict = {}
    for f in config_fields():
        if _get(values, f.key) != _get(defaults, f.key):
            _set(out, f.key, _get(values, f.key))
    return out


def to_yaml(cfg: ExperimentConfig, name: str) -> str:
    diff = differences(cfg)
    diff.pop("outputs_dir", None)  # where runs go belongs to the machine, not the experiment
    diff = {"experiment": name, **{k: v for k, v in diff.items() if k != "experiment"}}
    return SAVED_HEADER + yaml.safe_dump(diff, sort_keys=False, allow_unicode=True, default_flow_style=False, width=100)


class ParameterForm:
    """The form for ``cfg``, built whether or not anyone is looking (tests drive it through the
    widgets' own API). ``root``: the project whose parameters/ Save writes to."""

    def __init__(self, cfg: ExperimentConfig, stage: str | None = None, root: Path | None = None, estimate=None):
        import ipywidgets as w

        self._w = w
        self.root = Path(root) if root else project_root()
        self.fields = config_fields()
        self.initial = cfg
        self.config: ExperimentConfig | None = cfg
        self.errors: dict[str, str] = {}
        self._estimate = estimate  # cfg -> text, or None: the estimate line stays hidden
        self.inputs: dict[str, Any] = {}
        self.labels: dict[str, Any] = {}
        self.messages: dict[str, Any] = {}
        values = cfg.to_dict()
        groups: dict[str, list] = {}
        for f in self.fields:
            section = f.key.split(".")[0] if "." in f.key else "run"
            groups.setdefault(section, []).append(self._row(f, _get(values, f.key)))
        self.general = w.HTML()
        self.estimate_line = w.HTML()
        titles = ["run", "model", "data", "convert", "train", "evaluate", "host"]
        # each section scrolls within itself, so Save and the estimate stay in sight
        boxed = w.Layout(max_height="460px", overflow="auto")
        self.sections = w.Accordion(children=[w.VBox(groups[t], layout=boxed) for t in titles], titles=tuple(titles))
        open_section = STAGE_SECTIONS.get(stage or "", None)
        self.sections.selected_index = titles.index(open_section) if open_section else None
        self.name = w.Text(value=cfg.experiment, description="name", layout=w.Layout(width="280px"))
        self.name.add_class("ftkit-save-name")
        self.overwrite = w.Checkbox(value=False, description="overwrite an existing file", indent=False)
        self.save_button = w.Button(description="Save", button_style="primary", icon="save")
        self.save_button.add_class("ftkit-save")
        self.save_button.on_click(lambda _: self.save())
        self.status = w.HTML()
        self.status.add_class("ftkit-save-status")
        save_row = w.HBox([self.name, self.save_button, self.overwrite])
        self.widget = w.VBox([w.HTML("<b>Hyperparameters</b>: edit, check, then Save to parameters/&lt;name&gt;.yaml "
                                     "(bold: differs from the default)"),
                              self.general, self.estimate_line, self.sections, save_row, self.status])
        self.widget.add_class("ftkit-form")
        self.refresh()

    # widgets per field ---------------------------------------------------------------------------
    def _row(self, f: Field, value: Any):
        w = self._w
        control = self._control(f, value)
        control.add_class("ftkit-field-" + f.key.replace(".", "-"))
        control.observe(lambda _change: self.refresh(), names="value")
        label = w.HTML(layout=w.Layout(width="260px"))
        label.add_class("ftkit-label")
        message = w.HTML(layout=w.Layout(min_width="280px", flex="1 1 auto"))
        message.add_class("ftkit-error")
        self.inputs[f.key], self.labels[f.key], self.messages[f.key] = control, label, message
        help_text = w.HTML(f"<span style='color:#666;font-size:85%'>{_escape(f.doc)}</span>") if f.doc else w.HTML()
        fixed = w.Layout(flex="0 0 auto")  # rows keep their height inside a section that scrolls
        return w.VBox([w.HBox([label, control, message], layout=w.Layout(flex="0 0 auto")), help_text], layout=fixed)

    def _control(self, f: Field, value: Any):
        w = self._w
        inner, nullable = _optional(f.hint)
        layout = w.Layout(width="360px")
        if typing.get_origin(f.hint) is Literal:
            return w.Dropdown(options=list(typing.get_args(f.hint)), value=value, layout=layout)
        if inner is bool and nullable:
            return w.Dropdown(options=[("auto (null)", None), ("true", True), ("false", False)], value=value,
                              layout=layout)
        if f.hint is bool:
            return w.Checkbox(value=value, indent=False)
        if "log_slider" in f.metadata and f.hint is float:
            low, high = f.metadata["log_slider"]
            exponent = math.log10(value) if value > 0 else low
            return w.FloatLogSlider(value=value, base=10, min=min(low, exponent), max=max(high, exponent), step=0.05,
                                    readout_format=".1e", continuous_update=False, layout=layout)
        if "slider" in f.metadata and f.hint is float:
            low, high, step = f.metadata["slider"]
            return w.FloatSlider(value=value, min=min(low, value), max=max(high, value), step=step,
                                 continuous_update=False, readout_format=".2f", layout=layout)
        if f.hint is int:
            return w.IntText(value=value, layout=layout)
        if f.hint is float:
            return w.FloatText(value=value, layout=layout)
        if f.hint is str or (inner is str and nullable):
            return w.Text(value="" if value is None else value, placeholder="null" if nullable else "",
                          layout=layout, continuous_update=True)
        # lists, mappings, Any, unions: YAML, as in a parameters file
        return w.Text(value=_yaml_inline(value), placeholder="null", layout=layout)

    def _value(self, f: Field) -> Any:
        """The field's value as a parameters file would hold it; raises ValueError for text that is not YAML."""
        control = self.inputs[f.key]
        inner, nullable = _optional(f.hint)
        if not isinstance(control, self._w.Text):
            return control.value
        text = control.value
        if f.hint is str or (inner is str and nullable):
            return None if nullable and text == "" else text
        if text.strip() == "":
            return None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"not valid YAML ({getattr(e, 'problem', e)}); write it as in a parameters file, "
                             "e.g. [q_proj, v_proj] or {user: question}") from None

    # validation, estimate, save ------------------------------------------------------------------
    def values(self) -> dict:
        """The form's values as a nested mapping (every key), with YAML errors in ``self.errors``."""
        tree: dict = {}
        for f in self.fields:
            try:
                _set(tree, f.key, self._value(f))
            except ValueError as e:
                self.errors[f.key] = str(e)
                _set(tree, f.key, f.default)
        return tree

    def refresh(self) -> None:
        """Validate the current values with load_config and show the result: errors beside their fields,
        changed fields in bold, the estimate when the values are valid."""
        self.errors = {}
        tree = self.values()
        self.config = None
        general = []
        if not self.errors:
            try:
                self.config = load_config(tree, source="form")
            except ConfigError as e:
                for message in e.errors:
                    match = _FIELD_IN_ERROR.match(message)
                    key = match.group(1) if match else None
                    if key in self.inputs:
                        self.errors.setdefault(key, message.split(":", 1)[1].strip() if ":" in message else message)
                    else:
                        general.append(message)
        for f in self.fields:
            changed = _get(tree, f.key) != f.default
            self.labels[f.key].value = f"<b>{f.key}</b>" if changed else f.key
            self.messages[f.key].value = (f"<span style='color:#b00020'>{_escape(self.errors[f.key])}</span>"
                                          if f.key in self.errors else self._path_note(f, _get(tree, f.key)))
        self.general.value = "".join(f"<div style='color:#b00020'>{_escape(m)}</div>" for m in general)
        self.estimate_line.value = self._estimate_text()

    def _path_note(self, f: Field, value: Any) -> str:
        if not f.is_path or not isinstance(value, str) or not value or value in (DEMO_DATA, DEMO_PREFERENCE_DATA):
            return ""
        if f.key == "train.accelerate_config" and "/" not in value and not value.endswith((".yaml", ".yml")):
            return ""  # a shipped template name
        p = Path(value) if Path(value).is_absolute() else self.root / value
        if any(ch in value for ch in "*?["):
            found = list(self.root.glob(value)) if not Path(value).is_absolute() else list(Path("/").glob(value[1:]))
            return "" if found else "<span style='color:#b36b00'>no file matches this pattern</span>"
        return "" if p.exists() else f"<span style='color:#b36b00'>not found ({_escape(value)})</span>"

    def _estimate_text(self) -> str:
        if self._estimate is None:
            return ""
        if self.config is None:
            return "<i>estimate: fix the values above first</i>"
        try:
            return self._estimate(self.config)
        except Exception as e:  # an estimate that cannot be made must not break the form
            return f"<i>no estimate: {_escape(str(e).splitlines()[0] if str(e) else type(e).__name__)}</i>"

    def save(self, name: str | None = None) -> Path | None:
        """Write parameters/<name>.yaml (differences from the defaults only); returns its path, or
        None with the reason in the form when the values are invalid or the file is not the form's."""
        name = (name or self.name.value).strip()
        self.refresh()
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name or ""):
            return self._fail(f"name {name!r}: use letters, digits, '-', '_' or '.' (it becomes parameters/<name>.yaml)")
        if self.config is None:
            return self._fail("not saved: fix the values marked in red first")
        path = self.root / "parameters" / f"{name}.yaml"
        if path.exists() and not self.overwrite.value and not path.read_text(encoding="utf-8").startswith(SAVED_HEADER):
            return self._fail(f"parameters/{name}.yaml exists and was not written by this form: choose another name "
                              "or tick 'overwrite an existing file'")
        from ftkit.core.files import atomic_write_text

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, to_yaml(self.config, name))
        self.status.value = (f"saved parameters/{name}.yaml; run it with <code>make run EXP={_escape(name)}</code>, "
                             f"or set experiment = \"{_escape(name)}\" in the parameters cell and run the notebook again")
        return path

    def _fail(self, message: str) -> None:
        self.status.value = f"<span style='color:#b00020'>{_escape(message)}</span>"
        return None


def _yaml_inline(value: Any) -> str:
    if value is None:
        return ""
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _escape(text: str) -> str:
    return html.escape(str(text), quote=True)
