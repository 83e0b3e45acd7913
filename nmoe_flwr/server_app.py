"""ServerApp: the three NMoE training stages, the baselines, and the results.

1. Extractor -- FedCE: :class:`PartialFedAvg` over the end-to-end classifier
   (``extractor.`` and, if ``fedce-average-head``, ``head.``); or FedSC
   (``fe-method = "fedsc"``): :class:`FedSC` with DP correlation matrices.
   A kNN probe scores the extractor on every client's test set.
2. Personalized experts: every client caches latents of the frozen
   extractor and trains its expert; the server collects the expert bank.
3. Gate: the bank goes to every client, then :class:`PartialFedAvg` over
   the gate (``fedgate``: ``shared.`` only; ``fedavg``: all; ``local``: none).

Then NMoE evaluation on each client's test set (which also writes every
client's inference checkpoint) and the paper's baselines (FedCE classifier,
local classifier, centralized MoE). ``pipeline = "alignment"`` runs
:mod:`nmoe_flwr.alignment_run` instead of stages 2-3. ``results.json`` is
rewritten after every stage; any error (bad config, failing client) ends
the run with status failed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from . import stages
from .alignment_run import run_alignment
from .config import RunConfig, parse_run_config
from .constants import (
    ACCURACY,
    ARRAYS,
    BYTES_PER_SAMPLE,
    CONFIG,
    EXPERT_BANK,
    EXTRACTOR_PREFIX,
    GATE_DECISION_PREFIX,
    GATE_SHARED_PREFIX,
    HEAD_PREFIX,
    IN_CHANNELS,
    MACRO_F1,
    METRICS,
    MSG_CORRELATION,
    MSG_EVAL_CLASSIFIER,
    MSG_EVAL_NMOE,
    MSG_EVAL_PROBE,
    MSG_EXPERT,
    MSG_EXPERT_BANK,
    MSG_FEDCE,
    MSG_FEDSC,
    MSG_GATE,
    MSG_INFO,
    MSG_LOCAL_BASELINE,
    NOISE_MULTIPLIER,
    NUM_CLASSES,
    NUM_ROUNDS,
    PARTITION_ID,
    ROUTED_TO_NEIGHBOUR,
)
from .data.federated import all_client_splits
from .messaging import (
    ClientFailure,
    broadcast,
    metrics_of,
    send_to_all,
    weights_message,
)
from .models import state_subset
from .privacy import GaussianMechanism
from .records import bank_to_record, from_record, to_record
from .results import RunRecorder
from .seeding import derive_seed
from .ssl import alpha_at
from .strategies import FedSC, PartialFedAvg, split_shared
from .training import resolve_runtime, set_torch_threads
from .workspace import cache_dir, run_dir

app = ServerApp()

GATE_SHARED = {
    "fedgate": (GATE_SHARED_PREFIX,),
    "fedavg": (GATE_SHARED_PREFIX, GATE_DECISION_PREFIX),
    "local": (),
}


def discover_nodes(grid: Grid, cfg: RunConfig, timeout: float = 300.0) -> tuple[dict[int, int], Mapping[str, float]]:
    """Wait for ``num-clients`` nodes and map node id -> partition id.

    The ServerApp cannot read a node's ``node_config``, so it asks every node
    (``query.info``); this also makes each client load and cache its data
    before training starts. Returns the map and one node's info record.
    """
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < cfg.num_clients:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of num-clients = {cfg.num_clients} nodes connected after {timeout:.0f} s")
        log(INFO, "Waiting for nodes: %d of %d connected", len(nodes), cfg.num_clients)
        time.sleep(1.0)
    if len(nodes) > cfg.num_clients:
        raise ValueError(f"{len(nodes)} nodes are connected but num-clients = {cfg.num_clients}; they must match")
    replies = send_to_all(grid, {n: RecordDict() for n in nodes}, MSG_INFO, cfg.round_timeout)
    pids = {node: int(rec[METRICS][PARTITION_ID]) for node, rec in replies.items()}
    if sorted(pids.values()) != list(range(cfg.num_clients)):
        raise ValueError(f"partition ids of the nodes are {sorted(pids.values())}, expected 0..{cfg.num_clients - 1}")
    return pids, replies[nodes[0]][METRICS]


def _client_metric_table(per_client: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    return stages.mean_metrics(per_client, (ACCURACY, MACRO_F1, ROUTED_TO_NEIGHBOUR, BYTES_PER_SAMPLE))


def rounds_of(result, num_rounds: int, what: str) -> dict[int, dict[str, float]]:
    """Aggregated training metrics per round of a finished ``Strategy.start``.

    Raises
    ------
    ClientFailure
        If fewer than ``num_rounds`` rounds were aggregated (replies missing).
    """
    if len(result.train_metrics_clientapp) != num_rounds:
        raise ClientFailure(f"{what}: only {len(result.train_metrics_clientapp)} of {num_rounds} rounds were aggregated")
    return {r: dict(m) for r, m in result.train_metrics_clientapp.items()}


def run_partial_fedavg(
    grid: Grid,
    cfg: RunConfig,
    initial: Mapping[str, torch.Tensor],
    prefixes: tuple[str, ...],
    message_type: str,
    num_rounds: int,
) -> tuple[ArrayRecord, dict[int, dict[str, float]]]:
    """Run one federated stage with :class:`PartialFedAvg`; return the final
    shared arrays and the aggregated training metrics per round."""
    strategy = PartialFedAvg(
        prefixes,
        train_message_type=message_type,
        fraction_evaluate=0.0,  # evaluation is a separate, final message
        min_train_nodes=cfg.num_clients,
        min_available_nodes=cfg.num_clients,
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=to_record(initial),
        num_rounds=num_rounds,
        timeout=cfg.round_timeout,
        train_config=ConfigRecord({NUM_ROUNDS: num_rounds}),
    )
    return result.arrays, rounds_of(result, num_rounds, message_type)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the config, then run the stages and baselines in order."""
    cfg = parse_run_config(context.run_config)  # fails the run before any work
    folder = run_dir(cfg.output_dir, cfg.run_name, context.run_id)
    rec = RunRecorder(folder, cfg.to_dict(), context.run_id)
    log(INFO, "nmoe-flwr run %s: results in %s", context.run_id, folder)
    t_run = time.perf_counter()
    try:
        run_pipeline(grid, cfg, rec)
    except BaseException as exc:
        rec.note("error", f"{type(exc).__name__}: {exc}")
        rec.timing("total", time.perf_counter() - t_run)
        rec.save("failed")
        raise
    rec.timing("total", time.perf_counter() - t_run)
    path = rec.save("completed")
    log(INFO, "Results (mean over %d clients):\n%s", cfg.num_clients, rec.table())
    log(INFO, "Wrote %s and rounds.csv", path)


def run_pipeline(grid: Grid, cfg: RunConfig, rec: RunRecorder) -> None:
    """The three stages, NMoE evaluation and baselines; records after each."""
    pids, info = rec.timed("discover-nodes", lambda: discover_nodes(grid, cfg))
    in_channels, num_classes = int(info[IN_CHANNELS]), int(info[NUM_CLASSES])
    timeout = cfg.round_timeout
    if cfg.pipeline == "alignment":
        run_alignment(grid, cfg, rec, pids, num_classes, lambda: stage_fedce(grid, cfg, rec, pids, in_channels, num_classes))
        return

    # Stage 1: the shared extractor
    if cfg.fe_method == "fedce":
        fe_arrays = stage_fedce(grid, cfg, rec, pids, in_channels, num_classes)
    else:
        fe_arrays = rec.timed("stage1-fedsc", lambda: stage_fedsc(grid, cfg, rec, in_channels))
    extractor_arrays, _ = split_shared(fe_arrays, (EXTRACTOR_PREFIX, HEAD_PREFIX))
    torch.save(state_subset(from_record(extractor_arrays), [EXTRACTOR_PREFIX]), rec.folder / "extractor.pt")
    per_client = metrics_of(rec.timed(
        "eval-extractor-knn", lambda: broadcast(grid, pids, weights_message(extractor_arrays), MSG_EVAL_PROBE, timeout)
    ))
    rec.result("extractor-knn", per_client, stages.mean_metrics(per_client))
    rec.save()
    if cfg.stages == "fe":
        return

    # Stage 2: personalized experts
    replies = rec.timed(
        "stage2-experts", lambda: broadcast(grid, pids, weights_message(extractor_arrays), MSG_EXPERT, timeout)
    )
    bank = {pid: from_record(reply[ARRAYS]) for pid, reply in replies.items()}
    expert_metrics = {
        pid: {k.removeprefix("expert-"): v for k, v in m.items() if k.startswith("expert-")}
        for pid, m in metrics_of(replies).items()
    }
    rec.stage("experts", {"per-client": {str(k): v for k, v in metrics_of(replies).items()}})
    rec.result("personalized-expert", expert_metrics, stages.mean_metrics(expert_metrics))
    rec.save()

    # Stage 3: gate against the frozen bank
    rec.timed(
        "stage3-send-bank",
        lambda: broadcast(grid, pids, RecordDict({EXPERT_BANK: bank_to_record(bank)}), MSG_EXPERT_BANK, timeout),
    )
    gate_prefixes = GATE_SHARED[cfg.gate_method]
    gate_init = stages.new_gate(cfg, derive_seed(cfg.seed, "gate-init")).state_dict()
    gate_arrays, gate_rounds = rec.timed(
        "stage3-gate",
        lambda: run_partial_fedavg(grid, cfg, gate_init, gate_prefixes, MSG_GATE, cfg.gate_rounds),
    )
    rec.add_rounds("gate", gate_rounds)
    rec.stage("gate", {"method": cfg.gate_method, "shared-prefixes": list(gate_prefixes), "rounds": gate_rounds})
    per_client = metrics_of(rec.timed(
        "eval-nmoe", lambda: broadcast(grid, pids, weights_message(gate_arrays), MSG_EVAL_NMOE, timeout)
    ))
    rec.result("nmoe", per_client, _client_metric_table(per_client))
    rec.save()

    # Baselines
    if cfg.local_baseline:
        per_client = metrics_of(rec.timed(
            "baseline-local-classifier",
            lambda: broadcast(grid, pids, RecordDict({CONFIG: ConfigRecord()}), MSG_LOCAL_BASELINE, timeout),
        ))
        rec.result("local-classifier", per_client, stages.mean_metrics(per_client))
        rec.save()
    if cfg.centralized_baseline:
        rec.timed("baseline-centralized-moe", lambda: centralized_baseline(cfg, rec, in_channels, num_classes))
        rec.save()


def stage_fedce(
    grid: Grid, cfg: RunConfig, rec: RunRecorder, pids: Mapping[int, int], in_channels: int, num_classes: int
) -> ArrayRecord:
    """Stage 1 by FedCE, then the FedCE end-to-end classifier on every test set."""
    prefixes = (EXTRACTOR_PREFIX, HEAD_PREFIX) if cfg.fedce_average_head else (EXTRACTOR_PREFIX,)
    init = stages.new_classifier(cfg, in_channels, num_classes, derive_seed(cfg.seed, "fedce-init")).state_dict()
    arrays, rounds = rec.timed(
        "stage1-fedce", lambda: run_partial_fedavg(grid, cfg, init, prefixes, MSG_FEDCE, cfg.fedce_rounds)
    )
    rec.add_rounds("fedce", rounds)
    rec.stage("fedce", {"shared-prefixes": list(prefixes), "rounds": rounds})
    per_client = metrics_of(rec.timed(
        "eval-fedce-classifier",
        lambda: broadcast(grid, pids, weights_message(arrays), MSG_EVAL_CLASSIFIER, cfg.round_timeout),
    ))
    rec.result("fedce-classifier", per_client, stages.mean_metrics(per_client))
    rec.save()
    return arrays


def stage_fedsc(grid: Grid, cfg: RunConfig, rec: RunRecorder, in_channels: int) -> ArrayRecord:
    """Stage 1 by FedSC, with the privacy budget of the shared matrices accounted."""
    num_rounds = cfg.fedsc_rounds
    mechanism = GaussianMechanism.for_budget(cfg.dp_epsilon, cfg.dp_delta, num_rounds)
    log(INFO, "FedSC: noise multiplier %.3f for (epsilon %s, delta %g) over %d rounds",
        mechanism.noise_multiplier, cfg.dp_epsilon, cfg.dp_delta, num_rounds)
    strategy = FedSC(
        alpha=lambda r: alpha_at(r, num_rounds, cfg.fedsc_alpha_start, cfg.fedsc_alpha_end),
        correlation_message_type=MSG_CORRELATION,
        train_message_type=MSG_FEDSC,
        stale_matrices=cfg.fedsc_stale_matrices,
        timeout=cfg.round_timeout,
        fraction_train=cfg.fraction_train,
        fraction_evaluate=0.0,
        min_available_nodes=cfg.num_clients,
    )
    init = stages.new_ssl_model(cfg, in_channels, derive_seed(cfg.seed, "fedsc-init")).state_dict()
    result = strategy.start(
        grid=grid, initial_arrays=to_record(init), num_rounds=num_rounds, timeout=cfg.round_timeout,
        train_config=ConfigRecord({NUM_ROUNDS: num_rounds, NOISE_MULTIPLIER: mechanism.noise_multiplier}),
    )
    rounds = rounds_of(result, num_rounds, MSG_FEDSC)
    releases = max(strategy.releases.values(), default=0)
    spent = mechanism.epsilon(releases)
    log(INFO, "FedSC: epsilon spent %.3f (delta %g) after %d releases per client", spent, cfg.dp_delta, releases)
    rec.add_rounds("fedsc", rounds)
    rec.stage("fedsc", {
        "rounds": rounds,
        "noise-multiplier": mechanism.noise_multiplier,
        "dp-epsilon-target": cfg.dp_epsilon,
        "dp-delta": cfg.dp_delta,
        "dp-epsilon-spent": spent,
        "matrix-releases-per-client-max": releases,
        "stale-matrices": cfg.fedsc_stale_matrices,
    })
    rec.save()
    return result.arrays


def centralized_baseline(cfg: RunConfig, rec: RunRecorder, in_channels: int, num_classes: int) -> None:
    """Centralized MoE on the pooled training data, in this process (no Flower).

    Needs the data set on the server's machine (true in simulation); where it
    is missing the baseline is skipped and the reason recorded.
    """
    try:
        splits = all_client_splits(cfg, cache_dir(cfg.output_dir))
    except Exception as exc:  # noqa: BLE001 -- recorded and reported, not hidden
        log(WARNING, "Centralized baseline skipped: %s", exc)
        rec.note("centralized-moe-skipped", str(exc))
        return
    set_torch_threads(cfg.torch_threads or (os.cpu_count() or 1))
    runtime = resolve_runtime(cfg.device, cfg.amp, cfg.channels_last)
    pooled = stages.DeviceData(
        torch.cat([s.train.images for s in splits]).to(runtime.device),
        torch.cat([s.train.labels for s in splits]).to(runtime.device),
    )
    tests = [stages.DeviceData.of(s.test, runtime) for s in splits]
    metrics = stages.train_centralized_moe(pooled, tests, in_channels, num_classes, cfg, runtime)
    per_client = dict(enumerate(metrics))
    rec.result("centralized-moe", per_client, stages.mean_metrics(per_client))


__all__ = ["app", "main"]
