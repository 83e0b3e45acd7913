"""The ``pipeline = "alignment"`` run: capacity-aware federated training of a global MoE.

Stage 1 (FedCE, or a saved extractor from ``extractor-checkpoint``) gives a
frozen extractor; every client caches its latents; then
:class:`~nmoe_flwr.strategies.ExpertAssignment` trains one gate and
``num-experts`` experts for ``moe-rounds`` rounds, assigning each client a
subset of experts per round under its capacity, and evaluates the global
model on the clients' test sets after every round.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from logging import INFO

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from . import stages
from .alignment import AlignmentScores, load_cv, rounds_to_target
from .capacity import parse_tiers
from .config import RunConfig
from .constants import (
    ACCURACY,
    ARRAYS,
    CONFIG,
    EXTRACTOR_PREFIX,
    MACRO_F1,
    MSG_EVAL_MOE,
    MSG_LATENTS,
    MSG_MOE,
    NUM_ROUNDS,
)
from .messaging import broadcast
from .plots import accuracy_curves, assignment_heatmap
from .records import from_record, to_record
from .results import RunRecorder
from .seeding import derive_seed
from .strategies import ExpertAssignment
from .strategies.partial_fedavg import split_shared


def run_alignment(grid: Grid, cfg: RunConfig, rec: RunRecorder, pids: Mapping[int, int], num_classes: int, stage_fedce) -> None:
    """Extractor, latents, then the assignment rounds; results, CSV and PNGs."""
    if cfg.extractor_checkpoint:
        extractor = torch.load(cfg.extractor_checkpoint, weights_only=True)
        log(INFO, "Using the extractor in %s (stage 1 skipped)", cfg.extractor_checkpoint)
        rec.note("extractor-checkpoint", cfg.extractor_checkpoint)
        extractor_arrays = to_record(extractor)
    else:
        extractor_arrays, _ = split_shared(stage_fedce(), (EXTRACTOR_PREFIX,))
    path = rec.folder / "extractor.pt"  # the extractor this run used, for reuse by others
    torch.save(from_record(extractor_arrays), path)
    rec.note("extractor-saved", str(path))
    rec.timed("cache-latents", lambda: broadcast(
        grid, pids, RecordDict({ARRAYS: extractor_arrays, CONFIG: ConfigRecord()}), MSG_LATENTS, cfg.round_timeout
    ))

    tiers = parse_tiers(cfg.tiers_spec, cfg.num_clients)
    scores = AlignmentScores(
        cfg.num_clients, cfg.num_experts, beta=cfg.fitness_beta, gamma=cfg.fitness_gamma,
        improvement_weight=cfg.fitness_improvement_weight, delta=cfg.usage_delta,
    )
    strategy = ExpertAssignment(
        rule=cfg.assignment, num_experts=cfg.num_experts, clients=dict(pids),
        profiles=dict(enumerate(tiers)), scores=scores, seed=derive_seed(cfg.seed, "assignment"),
        fitness_weight=cfg.fitness_weight, usage_weight=cfg.usage_weight, cap_slack=cfg.load_cap_slack,
        train_message_type=MSG_MOE, evaluate_message_type=MSG_EVAL_MOE,
        fraction_train=cfg.fraction_train, min_available_nodes=cfg.num_clients,
    )
    init = stages.new_global_moe(cfg, num_classes, derive_seed(cfg.seed, "moe-init")).state_dict()
    t0 = time.perf_counter()
    result = rec.timed("alignment-rounds", lambda: strategy.start(
        grid=grid, initial_arrays=to_record(init), num_rounds=cfg.moe_rounds, timeout=cfg.round_timeout,
        train_config=ConfigRecord({NUM_ROUNDS: cfg.moe_rounds}),
    ))
    log(INFO, "Alignment rounds took %.1f s", time.perf_counter() - t0)

    accuracy = {r: float(m[ACCURACY]) for r, m in result.evaluate_metrics_clientapp.items()}
    f1 = {r: float(m[MACRO_F1]) for r, m in result.evaluate_metrics_clientapp.items()}
    rows, sim_total, counts = [], 0.0, np.zeros((cfg.num_clients, cfg.num_experts), dtype=int)
    for entry in strategy.history:
        sim_total += entry.sim_seconds
        for client, experts in entry.assignment.items():
            counts[client, experts] += 1
        rows.append({
            "round": entry.server_round, ACCURACY: accuracy.get(entry.server_round, math.nan),
            MACRO_F1: f1.get(entry.server_round, math.nan), "bytes": entry.bytes_down + entry.bytes_up,
            "sim-seconds": entry.sim_seconds, "sim-seconds-total": sim_total,
            "load-cv": load_cv(np.asarray(entry.load)),
            "expert-load": " ".join(f"{v:.0f}" for v in entry.load),
        })
    rec.rounds.extend({"stage": "alignment", **row} for row in rows)
    target_round = rounds_to_target(accuracy, cfg.target_accuracy)
    total_load = np.sum([e.load for e in strategy.history], axis=0)
    summary = {
        "assignment": cfg.assignment,
        "final-accuracy": accuracy.get(cfg.moe_rounds, math.nan),
        "final-macro-f1": f1.get(cfg.moe_rounds, math.nan),
        "best-accuracy": max(accuracy.values(), default=math.nan),
        "target-accuracy": cfg.target_accuracy,
        "rounds-to-target": target_round,
        "sim-seconds-to-target": sum(e.sim_seconds for e in strategy.history if target_round and e.server_round <= target_round) if target_round else None,
        "sim-seconds-total": sim_total,
        "bytes-total": int(sum(r["bytes"] for r in rows)),
        "load-cv": load_cv(total_load),
        "expert-load-total": total_load.tolist(),
        "assignment-counts": counts.tolist(),
        "capacities": [p.max_experts for p in tiers],
    }
    rec.stage("alignment", {"summary": summary, "rounds": {str(r["round"]): r for r in rows}})
    rec.result("alignment-global-moe", {}, {ACCURACY: summary["final-accuracy"], MACRO_F1: summary["final-macro-f1"]})
    assignment_heatmap(counts, rec.folder / "assignment_heatmap.png", f"{cfg.assignment}: rounds each client trained each expert")
    accuracy_curves({cfg.assignment: accuracy}, rec.folder / "accuracy.png", cfg.target_accuracy)
    log(INFO, "Alignment (%s): final accuracy %.4f, rounds to %.2f: %s, load CV %.3f, %.1f MB",
        cfg.assignment, summary["final-accuracy"], cfg.target_accuracy, target_round, summary["load-cv"],
        summary["bytes-total"] / 1e6)
