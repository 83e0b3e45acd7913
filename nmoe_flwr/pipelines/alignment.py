"""The alignment pipeline on the server: capacity-aware federated training of a global MoE.

Stage 1 (by ``fe-method``, or a saved extractor from ``extractor-checkpoint``)
gives a frozen extractor; every client caches its latents; then
:class:`~nmoe_flwr.strategies.ExpertAssignment` trains one gate and
``num-experts`` experts for ``moe-rounds`` rounds, aligning clients with
experts each round by the ``assignment`` rule under every client's capacity,
and evaluates the global model on the clients' test sets after every round.
Writes the summary, per-round rows, an assignment heatmap and an accuracy
curve. Adding an assignment rule: ``algorithms/alignment.py`` (``RULES`` and
:func:`~nmoe_flwr.algorithms.alignment.assign`) and the ``assignment``
literal in ``config.py``.
"""

from __future__ import annotations

import math
import time
from logging import INFO

import numpy as np
from flwr.app import ConfigRecord
from flwr.supercore import log

from ..algorithms.alignment import AlignmentScores, load_cv, rounds_to_target
from ..algorithms.global_moe import new_global_moe
from ..algorithms.seeding import derive_seed
from ..capacity import parse_tiers
from ..constants import (
    ACCURACY,
    BYTES,
    EXTRACTOR_PREFIX,
    MACRO_F1,
    MSG_EVAL_MOE,
    MSG_LATENTS,
    MSG_MOE,
    NUM_ROUNDS,
    SIM_SECONDS,
)
from ..records import to_record
from ..strategies import ExpertAssignment, split_shared
from .extractor import train_extractor
from .messaging import Federation, weights_message
from .plots import accuracy_curves, assignment_heatmap
from .results import RunRecorder


def run_alignment(fed: Federation, rec: RunRecorder) -> None:
    """Extractor, latents, then the assignment rounds; results, CSV and PNGs."""
    cfg, pids = fed.cfg, fed.pids
    extractor, _ = split_shared(train_extractor(fed, rec), (EXTRACTOR_PREFIX,))
    rec.timed("cache-latents", lambda: fed.broadcast(weights_message(extractor), MSG_LATENTS))

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
        fraction_train=cfg.fraction_train, min_available_nodes=cfg.num_clients, node_wait=cfg.rejoin_timeout,
    )
    init = new_global_moe(cfg.mlp_hidden, fed.num_classes, cfg.num_experts, derive_seed(cfg.seed, "moe-init")).state_dict()
    t0 = time.perf_counter()
    result = rec.timed("alignment-rounds", lambda: strategy.start(
        grid=fed.grid, initial_arrays=to_record(init), num_rounds=cfg.moe_rounds, timeout=cfg.round_timeout,
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
            MACRO_F1: f1.get(entry.server_round, math.nan), BYTES: entry.bytes_down + entry.bytes_up,
            SIM_SECONDS: entry.sim_seconds, "sim-seconds-total": sim_total,
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
        "bytes-total": int(sum(r[BYTES] for r in rows)),
        "load-cv": load_cv(total_load),
        "expert-load-total": total_load.tolist(),
        "assignment-counts": counts.tolist(),
        "capacities": [p.max_experts for p in tiers],
    }
    rec.stage_details("alignment", {"summary": summary, "rounds": {str(r["round"]): r for r in rows}})
    rec.result("alignment-global-moe", {}, {ACCURACY: summary["final-accuracy"], MACRO_F1: summary["final-macro-f1"]})
    assignment_heatmap(counts, rec.folder / "assignment_heatmap.png", f"{cfg.assignment}: rounds each client trained each expert")
    accuracy_curves({cfg.assignment: accuracy}, rec.folder / "accuracy.png", cfg.target_accuracy)
    log(INFO, "Alignment (%s): final accuracy %.4f, rounds to %.2f: %s, load CV %.3f, %.1f MB",
        cfg.assignment, summary["final-accuracy"], cfg.target_accuracy, target_round, summary["load-cv"],
        summary["bytes-total"] / 1e6)
