"""The five notebooks through papermill, as `make run` runs them, on the smoke experiment (the ``smoke``
fixture, in conftest.py: one run per session, shared with tests/test_reports.py)."""

import json
import math
import os
import re
import subprocess

import pytest
from conftest import PLANTED_SECRETS, ROOT, run_make

STAGES = ["01_data_prep", "02_format_conversion", "03_train", "04_evaluate", "05_host"]


def _metrics(root, stage):
    return json.loads((root / "metrics" / f"{stage}.json").read_text())


def test_reports_written(smoke):
    for stage in STAGES:
        assert (smoke / "reports" / f"{stage}.ipynb").exists()
        html = (smoke / "reports" / f"{stage}.html").read_text()
        assert "Provenance" in html
        assert "import ftkit" not in html  # code cells are hidden in the HTML report
        assert not (smoke / "reports" / f"{stage}.partial.ipynb").exists()


def test_stage_metrics(smoke):
    m1 = _metrics(smoke, "01_data_prep")
    assert m1["rows_in"] == m1["rows_kept"] + m1["rows_quarantined"] and m1["rows_quarantined"] > 0
    m2 = _metrics(smoke, "02_format_conversion")
    assert m2["kept"]["train"] == m1["conversations"]["train"]
    assert m2["end_of_turn_token"] == "<|im_end|>" and m2["pad_token"] != "<|im_end|>"
    assert 0 < m2["token_stats"]["train"]["trained_token_share"] < 1
    m3 = _metrics(smoke, "03_train")
    assert m3["steps"] == 8 and m3["train_loss_last"] < m3["train_loss_first"]
    m4 = _metrics(smoke, "04_evaluate")
    for model in ("base", "tuned"):
        assert {"loss", "perplexity", "rougeL", "rule_pass_rate", "stop_rate"} <= set(m4[model])
    assert m4["tuned"]["loss"] < m4["base"]["loss"]
    m5 = _metrics(smoke, "05_host")
    assert m5["merge_check_passed"] and m5["max_logit_diff_adapter_vs_base"] > m5["max_logit_diff_merged_vs_adapter"]
    assert m5["stream_matches_plain"] and m5["shutdown_exit_code"] == 0
    assert (smoke / "merged" / "model.safetensors").exists()
    assert m5["saved_eos_includes_end_of_turn"] and m5["saved_chat_template_matches"]
    # the random smoke model does not learn to stop (min_stop_rate 0 in smoke.yaml); its prompts must still match
    assert m5["consistency_prompts_match"] and m5["consistency_no_run_on"] and m5["consistency_cases"] >= 8
    assert [lv["concurrency"] for lv in m5["load"]] == [1, 4, 16]
    assert all(lv["tokens_per_s_total"] > 0 and lv["ttft_median_s"] > 0 for lv in m5["load"])
    assert m5["cost"]["hosted_monthly_usd"] > 0 and m5["cost"]["machines"] >= 1
    assert m5["gguf_passed"] and [g["type"] for g in m5["gguf"]] == ["q8_0"]
    assert (smoke / "exports" / "smoke-q8_0.gguf").exists() and "<|im_end|>" in (smoke / "exports" / "Modelfile").read_text()


def test_unknown_key_stops_at_config_cell(tmp_path, root):
    params = tmp_path / "bad.yaml"
    params.write_text("experiment: bad\nmodel: {name: tiny-random}\ntrain: {learnin_rate: 1e-4}\n")
    proc = run_make("01", "EXP=bad", f"PARAMS={params}", f"OUTPUTS={tmp_path}")
    assert proc.returncode != 0
    reports = tmp_path / "bad" / "reports"
    partial = (reports / "01_data_prep.partial.ipynb").read_text()
    assert "train.learnin_rate: unknown key; did you mean 'learning_rate'" in partial
    assert not (reports / "01_data_prep.ipynb").exists() and not (reports / "01_data_prep.html").exists()
    assert not (tmp_path / "bad" / "data").exists()  # nothing ran past the config cell


def test_unknown_top_level_key_is_rejected(tmp_path, root):
    params = tmp_path / "bad2.yaml"
    params.write_text("experiment: bad2\ntrian: {max_steps: 1}\n")
    proc = run_make("01", "EXP=bad2", f"PARAMS={params}", f"OUTPUTS={tmp_path}")
    assert proc.returncode != 0
    assert "trian: unknown key; did you mean 'train'" in proc.stderr + proc.stdout


# measured on this machine at this moment (timings, memory, throughput and what is sized from them) or
# naming where the run lives: equal in kind, not in value
VOLATILE = re.compile(r"second|_s$|_s_|per_s|ttft|latency|duration|memory|_mb$|_gb$|^load$|^cost$|capacity"
                      r"|created|base_url|^url$|port|pid|stream_chunks|flos|gflops")


def _same(a, b, where=""):
    """Differences between two metrics trees: keys everywhere, values outside VOLATILE within float noise."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}: keys {sorted(set(a) ^ set(b))}"] if set(a) != set(b) else []
        for k in set(a) & set(b):
            if not VOLATILE.search(str(k)):
                out += _same(a[k], b[k], f"{where}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _same(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, (int, float)):
        return [] if math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6) else [f"{where}: {a} vs {b}"]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def test_ftkit_run_matches_make_run(smoke, tmp_path_factory):
    """`ftkit run parameters/smoke.yaml` (no papermill) writes the metrics `make run EXP=smoke` writes."""
    out = tmp_path_factory.mktemp("cli")
    # the same environment as the smoke run, planted keys included (FTKIT_API_KEY makes stage 05 require one)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")} | PLANTED_SECRETS
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "ftkit"), "run", "parameters/smoke.yaml", "--stages", "01-05",
                           "--outputs-dir", str(out)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cli, diffs = out / "smoke", []
    for stage in STAGES:
        a = json.loads(json.dumps(_metrics(smoke, stage)).replace(str(smoke.parent), "<outputs>"))
        b = json.loads(json.dumps(_metrics(cli, stage)).replace(str(out), "<outputs>"))
        diffs += _same(a, b, stage)
    assert not diffs, diffs[:20]
    assert not (cli / "reports").exists()  # no notebooks ran


def test_stages_parse():
    from ftkit.pipeline import StageSpecError, parse_stages

    assert parse_stages("01-05") == ["01", "02", "03", "04", "05"]
    assert parse_stages("3-4,1") == ["01", "03", "04"]
    for bad in ("05-01", "0", "6", "x", ","):
        with pytest.raises(StageSpecError):
            parse_stages(bad)
