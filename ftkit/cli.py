"""Command line: ``ftkit serve MODEL_DIR``, ``ftkit check-params FILE``, ``ftkit import-openai-job JOB -o FILE``,
``ftkit demo-data PATH``, ``ftkit index EXP``, ``ftkit compare A B``."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ftkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="OpenAI-compatible server for a merged model or an adapter directory")
    s.add_argument("model_dir")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need --api-key)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get("FTKIT_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' (default: $FTKIT_API_KEY)")
    s.add_argument("--name", default=None, help="model id clients send (default: the directory name)")
    s.add_argument("--max-tokens-cap", type=int, default=512, help="largest max_tokens a request may ask for")
    s.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="refuse longer prompts (default: the model's context)")
    s.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="KV cache pool shared by concurrent requests, in tokens (bounds memory; default: 16,384 "
                        "on a CPU, sized from free memory on a GPU)")
    s.add_argument("--threads", type=int, default=None, help="CPU threads for the model (default: one less than the cores)")
    s.add_argument("--read-timeout", type=float, default=None,
                   help="seconds a client may stay silent mid-request or idle before its connection is closed (default 10)")
    s.add_argument("--engine", choices=("ftkit", "vllm"), default="ftkit",
                   help="ftkit (default: transformers' engine, CPU or GPU) or vllm (vLLM's OpenAI server on a "
                        "merged directory with the training template, stop tokens and key; many streams on a GPU)")

    c = sub.add_parser("check-params", help="validate a parameters YAML file without running anything")
    c.add_argument("file")
    c.add_argument("--top-level-only", action="store_true",
                   help="only reject unknown top-level keys (papermill would merely warn about them)")

    v = sub.add_parser("validate", help="check data files; one 'path:N: field: reason' per problem (N: the line, "
                                        "or the data row of a table); exit 1 on any")
    v.add_argument("files", nargs="+")
    v.add_argument("--format", default="auto", help="auto (default), messages, sharegpt, alpaca, prompt_completion, "
                                                    "text, columns")
    v.add_argument("--columns", default=None, help="for tables: user=COL,assistant=COL[,system=COL]")
    v.add_argument("--no-alternation", action="store_true", help="do not require user/assistant alternation")
    v.add_argument("--encoding", default="utf-8", help="text encoding of the files: utf-8 (default; a BOM is fine), cp1252, latin-1…")

    cv = sub.add_parser("convert", help="convert data files; records with problems are reported and left out")
    cv.add_argument("files", nargs="+")
    cv.add_argument("--to", required=True, choices=["openai", "sharegpt", "parquet", "datasets"])
    cv.add_argument("-o", "--output", required=True)
    cv.add_argument("--format", default="auto")
    cv.add_argument("--columns", default=None)
    cv.add_argument("--no-alternation", action="store_true")
    cv.add_argument("--encoding", default="utf-8", help="text encoding of the files: utf-8 (default; a BOM is fine), cp1252, latin-1…")

    t = sub.add_parser("train", help="run stage 03 headless on a parameters file (what accelerate launch runs)")
    t.add_argument("params")
    t.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, YAML value: --override train.max_steps=10")

    r = sub.add_parser("run", help="run stages 01-05 on a parameters file without papermill (same functions, "
                                   "outputs and metrics as the notebooks)")
    r.add_argument("params", help="a parameters YAML file, e.g. parameters/demo.yaml")
    r.add_argument("--stages", default="01-05", help="which stages, in order: 01-05 (default), 03-05, 01,02")
    r.add_argument("--experiment", default=None,
                   help="run name (default: the file's experiment key, else its name without .yaml)")
    r.add_argument("--outputs-dir", default=None, help="where runs go (default: the file's outputs_dir, else outputs)")
    r.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, YAML value: --override train.max_steps=10")

    cr = sub.add_parser("config-reference", help="write the configuration reference generated from the config "
                                                 "dataclasses (docs/configuration.md)")
    cr.add_argument("-o", "--output", default=None, help="file to write (default: print it)")

    oj = sub.add_parser("import-openai-job", help="an OpenAI fine-tuning job (JSON) as a parameters YAML file")
    oj.add_argument("job", help="the job object (client.fine_tuning.jobs.retrieve(ID)) or the create request, as JSON")
    oj.add_argument("-o", "--output", required=True, help="the parameters file to write, e.g. parameters/mine.yaml")
    oj.add_argument("--training-file", default=None,
                    help="the local training JSONL (the job's training_file is an OpenAI file id)")
    oj.add_argument("--validation-file", default=None, help="the local validation JSONL, if the job had one")

    d = sub.add_parser("demo-data", help="write the AcmeCorp demo CSV")
    d.add_argument("path")
    d.add_argument("--n", type=int, default=1000)
    d.add_argument("--seed", type=int, default=42)

    x = sub.add_parser("export-tools", help="fetch llama.cpp's converter and templates (pinned, hashed); --build also "
                                            "builds llama-cpp-python once (quantiser, GGUF loading checks)")
    x.add_argument("--build", action="store_true", help="also build and install llama-cpp-python (minutes)")

    ix = sub.add_parser("index", help="write outputs/<experiment>/index.html (the five reports and their headline "
                                      "figures) and print a short summary")
    ix.add_argument("experiment")
    ix.add_argument("--outputs-dir", default="outputs", help="where runs are (default outputs)")
    ix.add_argument("--quiet", action="store_true", help="print only the index's path, not the summary")

    cm = sub.add_parser("compare", help="one HTML page with the config keys that differ between runs and their "
                                        "metrics side by side (with stage 04's intervals)")
    cm.add_argument("experiments", nargs="+", metavar="EXPERIMENT")
    cm.add_argument("-o", "--output", default=None, help="the page to write (default <outputs-dir>/compare-A-B.html)")
    cm.add_argument("--outputs-dir", default="outputs", help="where runs are (default outputs)")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.command == "serve":
        from pathlib import Path

        from ftkit.host.http_limits import READ_TIMEOUT_S
        from ftkit.host.serve import make_server, serve_forever

        model_dir = Path(args.model_dir)
        if not any((model_dir / f).is_file() for f in ("config.json", "adapter_config.json")):
            why = "no config.json or adapter_config.json in it" if model_dir.is_dir() else "no such folder"
            print(f"error: {model_dir}: not a model directory ({why}); serve a merged model (outputs/<experiment>/"
                  "merged, written by stage 05) or a trained adapter (outputs/<experiment>/adapter)", file=sys.stderr)
            return 2
        if args.engine == "vllm":
            from ftkit.host.vllm_engine import VLLMSetupError, exec_vllm, vllm_command

            try:
                argv, env = vllm_command(model_dir, args.host, args.port, args.api_key, args.name,
                                         args.max_prompt_tokens)
                print("ftkit: " + " ".join(argv), flush=True)
                exec_vllm(argv, env)
            except VLLMSetupError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        try:
            server = make_server(args.model_dir, args.host, args.port, args.api_key, args.max_tokens_cap, args.name,
                                 max_prompt_tokens=args.max_prompt_tokens, kv_cache_tokens=args.kv_cache_tokens,
                                 threads=args.threads, read_timeout=args.read_timeout or READ_TIMEOUT_S)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        serve_forever(server)
        return 0
    if args.command == "check-params":
        from ftkit.core.config import ConfigError, check_top_level, load_config, read_yaml

        try:
            params = read_yaml(args.file)
            check_top_level(params, args.file)
            if not args.top_level_only:
                load_config(params, source=args.file)
        except ConfigError as e:
            print(e, file=sys.stderr)
            return 2
        print(f"{args.file}: ok")
        return 0
    if args.command == "run":
        return _run(args)
    if args.command in ("index", "compare"):
        return _report_pages(args)
    if args.command == "config-reference":
        from ftkit.core import config_reference

        if args.output:
            print(config_reference.write(args.output))
        else:
            print(config_reference.markdown(), end="")
        return 0
    if args.command == "train":

        from ftkit import run_paths
        from ftkit.core.config import ConfigError, load_config
        from ftkit.core.files import write_json
        from ftkit.train.training import train

        try:
            overrides = _overrides(args.override)
            cfg = load_config(args.params, overrides=overrides)
        except ConfigError as e:
            print(e, file=sys.stderr)
            return 2
        metrics = train(cfg, run_paths(cfg))
        if int(os.environ.get("RANK", "0")) == 0:  # under accelerate launch, the main process writes
            write_json(run_paths(cfg).metrics("03_train"), metrics)
            print(f"train_loss_last={metrics['train_loss_last']} steps={metrics['steps']}")
        return 0
    if args.command == "export-tools":
        import time

        from ftkit.host import llama_cpp

        try:
            print(f"llama.cpp tools: {llama_cpp.fetch(quiet=False)} ({len(llama_cpp.templates())} chat templates)")
            if args.build:
                t0 = time.perf_counter()
                wheel = llama_cpp.build_wheel()
                print(f"llama-cpp-python: {wheel} installed ({time.perf_counter() - t0:,.0f} s)")
        except llama_cpp.ToolError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.command in ("validate", "convert"):
        return _check_command(args)
    if args.command == "import-openai-job":
        from ftkit.core.config import ConfigError

        from .openai_job import JobError, import_job

        try:
            out = import_job(args.job, args.output, args.training_file, args.validation_file)
        except (JobError, ConfigError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {out}")
        return 0
    if args.command == "demo-data":
        from ftkit.data.demo_data import write_csv

        print(write_csv(args.path, args.n, args.seed))
        return 0
    return 1


def _check_command(args) -> int:
    from ftkit.core.formats import FORMATS
    from ftkit.core.readers import InputError, encoding_problem
    from ftkit.data.checker import CheckSummary, check, clean_for_export, parse_columns, write_records

    if args.format != "auto" and args.format not in FORMATS:
        print(f"error: --format {args.format!r}: choose auto or one of {', '.join(FORMATS)}", file=sys.stderr)
        return 2
    if problem := encoding_problem(args.encoding):
        print(f"error: --encoding {problem}", file=sys.stderr)
        return 2
    try:
        columns = parse_columns(args.columns)
        summary = CheckSummary()
        good = []
        for where, rec, problems in check(args.files, args.format, columns, not args.no_alternation, summary,
                                          encoding=args.encoding):
            for p in problems:
                print(f"{where}: {p}")
            if rec is not None and not problems and args.command == "convert":
                good.append(clean_for_export(rec))
        if args.command == "convert":
            out = write_records(good, args.to, args.output)
            print(f"wrote {len(good):,} records to {out} ({args.to})", file=sys.stderr)
    except (InputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.line(), file=sys.stderr)
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())


def _run(args) -> int:
    """``ftkit run``: the stages as the notebooks run them, headless, ending with where the reports are."""
    from pathlib import Path

    from ftkit import pipeline, run_paths
    from ftkit.core.config import ConfigError, check_top_level, load_config, read_yaml

    os.environ["FTKIT_HEADLESS"] = "1"  # no widgets: a fixed list of prompts, the server stopped at the end
    try:
        stages = pipeline.parse_stages(args.stages)
        params = read_yaml(args.params)
        check_top_level(params, args.params)
        params["experiment"] = args.experiment or params.get("experiment") or Path(args.params).stem
        if args.outputs_dir:
            params["outputs_dir"] = args.outputs_dir
        overrides = {**params.pop("overrides", {}),
                     **_overrides(args.override)}
        cfg = load_config(params, overrides=overrides, source=args.params)
    except (ConfigError, pipeline.StageSpecError) as e:
        print(e, file=sys.stderr)
        return 2
    from ftkit.core.files import DiskFullError
    from ftkit.core.paths import StageNotDone

    paths = run_paths(cfg)
    try:
        pipeline.run(cfg, paths, stages)
    except (StageNotDone, DiskFullError) as e:  # what to rerun or where space is short: no traceback needed
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{cfg.experiment}: stages {', '.join(stages)} done; metrics under {paths.root / 'metrics'}")
    return 0


def _report_pages(args) -> int:
    """``ftkit index`` and ``ftkit compare``: pages built from the runs' metrics files, nothing re-run."""
    from ftkit.core.paths import RunPaths
    from ftkit.report import compare, overview

    if args.command == "index":
        paths = RunPaths(args.outputs_dir, args.experiment)
        if not paths.root.is_dir():
            print(f"error: no run {args.experiment!r} under {args.outputs_dir}", file=sys.stderr)
            return 2
        index = overview.write_index(paths)
        print(f"wrote {overview.terminal_path(index)}" if args.quiet else "\n".join(overview.summary_lines(paths, index)))
        return 0
    if len(args.experiments) < 2:
        print("error: name at least two experiments to compare", file=sys.stderr)
        return 2
    try:
        out = compare.write_comparison(args.outputs_dir, args.experiments, args.output)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {overview.terminal_path(out)}")
    return 0


def _overrides(pairs: list[str]) -> dict:
    """``--override KEY=VALUE`` options as dotted overrides, each value read as YAML."""
    import yaml

    return {k: yaml.safe_load(v) for k, _, v in (o.partition("=") for o in pairs)}
