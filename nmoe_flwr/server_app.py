"""ServerApp: validate the config, open the run's record, run the chosen pipeline.

``pipeline = "nmoe"`` runs :func:`nmoe_flwr.pipelines.nmoe.run_nmoe` (the
three NMoE training stages, the NMoE evaluation and the baselines);
``pipeline = "alignment"`` runs :func:`nmoe_flwr.pipelines.alignment.run_alignment`
(capacity-aware federated training of a global MoE). ``results.json`` is
rewritten after every step; any error (bad config, failing client) ends the
run with status ``failed`` and the error recorded.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from logging import INFO

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from .config import RUN_NAME_PATTERN, ConfigError, parse_run_config
from .pipelines.alignment import run_alignment
from .pipelines.messaging import Federation
from .pipelines.nmoe import run_nmoe
from .pipelines.results import RunRecorder
from .strategies.restart_watch import RestartAwareGrid
from .workspace import run_dir

app = ServerApp()

PIPELINES: dict[str, Callable[[Federation, RunRecorder], None]] = {"nmoe": run_nmoe, "alignment": run_alignment}
"""``pipeline`` -> what the server runs once the clients are connected."""


def _record_config_failure(context: Context, error: ConfigError) -> None:
    """Mark a named run's folder ``failed`` when its name and output folder can be read from the raw config.

    Otherwise an older results.json under the same run name would still say
    "completed" after this run was refused. (An unnamed run has a fresh
    ``run-<id>`` folder: nothing to overwrite, nothing written.)
    """
    name, out = context.run_config.get("run-name", ""), context.run_config.get("output-dir", "")
    if name and isinstance(name, str) and isinstance(out, str) and re.fullmatch(RUN_NAME_PATTERN, name):
        path = RunRecorder.config_failure(run_dir(out, name, context.run_id), context.run_config, context.run_id, error)
        log(INFO, "Config refused; recorded in %s", path)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the config, discover the nodes, then run the pipeline."""
    try:
        cfg = parse_run_config(context.run_config)  # fails the run before any work
    except ConfigError as exc:
        _record_config_failure(context, exc)
        raise
    folder = run_dir(cfg.output_dir, cfg.run_name, context.run_id)
    rec = RunRecorder(folder, cfg.to_dict(), context.run_id, resume=cfg.resume)
    log(INFO, "nmoe-flwr run %s: results in %s", context.run_id, folder)
    t_run = time.perf_counter()
    try:
        # Every send of the run goes through it: a node that restarts mid-round is not waited for (restart_watch.py).
        fed = rec.timed("discover-nodes", lambda: Federation.discover(RestartAwareGrid(grid), cfg))
        PIPELINES[cfg.pipeline](fed, rec)
    except BaseException as exc:
        rec.note("error", f"{type(exc).__name__}: {exc}")
        rec.timing("total", time.perf_counter() - t_run)
        rec.save("failed")
        raise
    rec.timing("total", time.perf_counter() - t_run)
    path = rec.save("completed")
    log(INFO, "Results (mean over %d clients):\n%s", cfg.num_clients, rec.table())
    log(INFO, "Wrote %s and rounds.csv", path)


__all__ = ["app", "main"]
