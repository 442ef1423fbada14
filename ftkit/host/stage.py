"""Stage 05 as one call: merge, serve, check what is served, measure it, export it (``run``).

The server it starts is stopped on every exit path; an interactive session may keep it (``keep_server``)
for the chat box, and then stops it itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ftkit.core.config import ExperimentConfig
from ftkit.core.paths import RunPaths

STAGE = "05_host"
log = logging.getLogger(__name__)


@dataclass
class HostResult:
    merge: dict
    check: dict  # the train/serve consistency check
    answers: list[dict]  # the served prompts, plain and streamed
    load: list[dict]  # latency and throughput at each concurrency
    costs: dict
    exports: dict  # GGUF files and the Modelfile, or why they were skipped
    commands: dict[str, str]  # how to serve the result elsewhere
    metrics: dict  # what metrics/05_host.json holds
    server: object | None = field(default=None, repr=False)  # kept running only when asked


def run(cfg: ExperimentConfig, paths: RunPaths, *, keep_server: bool = False) -> HostResult:
    """Stage 05: ``merged/``, ``exports/``, ``logs/server.log`` and the metrics."""
    from ftkit.core.progress import timed
    from ftkit.host import client, consistency, cost, gguf, loadtest, merge

    with paths.stage(STAGE, after="03_train"):  # never merge the adapter of a run that did not finish
        with timed("05_host: merge"):
            merged = merge.merge_adapter(cfg, paths, client.check_prompts(paths))
        server = client.start_server(cfg, paths)
        kept = False
        try:
            check = consistency.consistency_check(server, cfg, paths)
            answers = client.ask_all(server, cfg, paths)
            load = loadtest.measure(server, cfg, client.check_prompts(paths, n=16))
            costs = cost.monthly_costs(cfg.host, **cost.capacity(load))
            exports = gguf.export_all(paths.merged_dir, paths, cfg.host.gguf_types, client.check_prompts(paths, n=8),
                                      cfg.convert.system_prompt)
            commands = client.serving_commands(cfg, paths, exports)
            kept = keep_server
        finally:
            code = None if kept else server.stop()
        metrics = {**merged, **check, **client.summary(answers), "load": load, "cost": costs, **exports,
                   "shutdown_exit_code": code, "api_key_required": client.api_key(cfg) is not None}
        paths.write_metrics(STAGE, metrics)
        paths.finish(STAGE, [paths.merged_dir, paths.exports_dir], after="03_train")
    return HostResult(merged, check, answers, load, costs, exports, commands, metrics, server if kept else None)
