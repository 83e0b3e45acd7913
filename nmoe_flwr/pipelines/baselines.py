"""The baselines beside NMoE: a local classifier per client and the centralized MoE.

(The FedCE end-to-end classifier is scored in stage 1 by
:func:`.extractor.train_fedce`.) Adding a baseline: a function here called
from :func:`run_baselines`, its switch in ``config.py``/``pyproject.toml``,
its label in :data:`.results.METHODS`, and, if clients compute it, a message
type in ``constants.py`` with its handler in ``client_app.py``.
"""

from __future__ import annotations

import os
from logging import WARNING

import torch
from flwr.app import ConfigRecord, RecordDict
from flwr.supercore import log

from ..algorithms.centralized import train_centralized_moe
from ..algorithms.training import (
    DeviceData,
    Runtime,
    mean_over_clients,
    resolve_runtime,
    set_torch_threads,
)
from ..constants import CONFIG, IID_PREFIX, MSG_LOCAL_BASELINE
from ..data import ClientSplits, all_client_splits, pixel_stats_for
from ..workspace import cache_dir
from .messaging import Federation
from .results import RunRecorder


def run_baselines(fed: Federation, rec: RunRecorder) -> None:
    """The baselines the config switches on, each recorded as it finishes."""
    resume = fed.cfg.resume  # a resumed run keeps the baselines its killed attempt finished
    if fed.cfg.local_baseline and not (resume and rec.has("results", "local-classifier")):
        per_client = rec.timed(
            "baseline-local-classifier",
            lambda: fed.broadcast_metrics(RecordDict({CONFIG: ConfigRecord()}), MSG_LOCAL_BASELINE),
        )
        rec.result("local-classifier", per_client, mean_over_clients(per_client))
        rec.save()
    if fed.cfg.centralized_baseline and not (resume and rec.has("results", "centralized-moe")):
        rec.timed("baseline-centralized-moe", lambda: centralized_baseline(fed, rec))
        rec.save()


def clients_data_on_server(fed: Federation, rec: RunRecorder, what: str) -> tuple[list[ClientSplits], Runtime] | None:
    """Every client's split, recomputed in the server's process, and a runtime
    with all its cores, for server-side work on pooled data (``what``).

    Needs the data set on the server's machine (true in simulation); where it
    is missing, ``None``: the step is skipped and the reason recorded as
    ``<what>-skipped``.
    """
    cfg = fed.cfg
    try:
        splits = all_client_splits(cfg, cache_dir(cfg.output_dir))
    except Exception as exc:  # noqa: BLE001 -- recorded and reported, not hidden
        log(WARNING, "%s skipped: %s", what, exc)
        rec.note(f"{what}-skipped", str(exc))
        return None
    set_torch_threads(cfg.torch_threads or (os.cpu_count() or 1))
    return splits, resolve_runtime(cfg.device, cfg.amp, cfg.channels_last)


def centralized_baseline(fed: Federation, rec: RunRecorder) -> None:
    """Centralized MoE on the pooled training data, in this process (no Flower)."""
    cfg = fed.cfg
    found = clients_data_on_server(fed, rec, "centralized-moe")
    if found is None:
        return
    splits, runtime = found
    pooled = DeviceData(
        torch.cat([s.train.images for s in splits]).to(runtime.device),
        torch.cat([s.train.labels for s in splits]).to(runtime.device),
    )
    tests = [DeviceData.of(s.test, runtime) for s in splits]
    iid = [DeviceData.of(s.test_iid, runtime) for s in splits if s.test_iid is not None]
    stats = pixel_stats_for(cfg.dataset, cfg.hf_dataset, fed.in_channels)
    scores = train_centralized_moe(pooled, tests + iid, stats, fed.num_classes, cfg, runtime)
    per_client = {i: dict(scores[i]) for i in range(len(tests))}
    for i, m in enumerate(scores[len(tests):]):  # the IID test setting, where there is one
        per_client[i] |= {IID_PREFIX + k: v for k, v in m.items()}
    rec.result("centralized-moe", per_client, mean_over_clients(per_client))
