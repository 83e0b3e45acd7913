"""The NMoE pipeline on the server: stage 1, experts, gate, evaluation, baselines.

1. Extractor by ``fe-method`` (:mod:`.extractor`); a kNN probe scores it on
   every client's test set.
2. Personalized experts: every client caches latents of the frozen
   extractor and trains its expert; the server collects the expert bank.
3. Gate: the bank goes to every client, then :class:`PartialFedAvg` over the
   gate (``fedgate``: ``shared.`` only; ``fedavg``: all; ``local``: none).

Then the NMoE evaluation on each client's test set (which also writes every
client's inference checkpoint) and the baselines (:mod:`.baselines`).
``results.json`` is rewritten after every step.
"""

from __future__ import annotations

from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, RecordDict
from flwr.supercore import log

from ..algorithms.candidates import choose_candidates
from ..algorithms.gate import new_gate
from ..algorithms.seeding import derive_seed
from ..algorithms.training import mean_over_clients
from ..constants import (
    ACCURACY,
    ARRAYS,
    BYTES_PER_SAMPLE,
    CLASS_SUPPORT_PREFIX,
    DOMINANT_SENT_AWAY,
    EXPERT_BANK,
    EXPERT_METRIC_PREFIX,
    GATE_DECISION_PREFIX,
    GATE_SHARED_PREFIX,
    IID_PREFIX,
    MACRO_F1,
    MINORITY_TO_OWNER,
    MSG_EVAL_NMOE,
    MSG_EVAL_PROBE,
    MSG_EXPERT,
    MSG_EXPERT_BANK,
    MSG_GATE,
    ORACLE_PREFIX,
    ROUTED_TO_NEIGHBOUR,
)
from ..records import bank_to_record, from_record, strip_prefix
from .baselines import run_baselines
from .extractor import train_extractor
from .messaging import Federation, metrics_of, weights_message
from .probes import pooled_probes
from .results import RunRecorder
from .resume import BANK_STAGE, StageCheckpoint, load_bank, save_bank

GATE_SHARED_PREFIXES = {
    "fedgate": (GATE_SHARED_PREFIX,),
    "fedavg": (GATE_SHARED_PREFIX, GATE_DECISION_PREFIX),
    "local": (),
}
"""``gate-method`` -> the gate's parameter prefixes the server averages."""


def run_nmoe(fed: Federation, rec: RunRecorder) -> None:
    """The three stages, the NMoE evaluation and the baselines; records after each."""
    extractor = train_extractor(fed, rec)
    resume = fed.cfg.resume  # steps whose results the killed attempt recorded are not redone
    if not (resume and rec.has("results", "extractor-knn")):
        missing: dict[int, str] = {}  # evaluation: a client that does not answer is reported, not fatal
        per_client = rec.timed(
            "eval-extractor-knn", lambda: fed.broadcast_metrics(weights_message(extractor), MSG_EVAL_PROBE, missing)
        )
        rec.result("extractor-knn", per_client, mean_over_clients(per_client), missing)
        rec.save()
    if fed.cfg.pooled_probe and not (resume and rec.has("stages", "pooled-probe")):
        rec.timed("pooled-probe", lambda: pooled_probes(fed, rec, extractor))
        rec.save()
    if fed.cfg.stages == "fe":
        return
    bank, support = train_experts(fed, rec, extractor)
    gate = train_gates(fed, rec, bank, support)
    missing = {}
    per_client = rec.timed("eval-nmoe", lambda: fed.broadcast_metrics(weights_message(gate), MSG_EVAL_NMOE, missing))
    for oracle in ORACLE_ROUTINGS:
        tag = f"{ORACLE_PREFIX}{oracle}-"  # "oracle-best-expert-accuracy", "iid-oracle-best-expert-accuracy"
        scores = {pid: {k.replace(tag, ""): v for k, v in m.items() if tag in k} for pid, m in per_client.items()}
        if all(scores.values()):
            rec.result(f"{ORACLE_PREFIX}{oracle}", scores, mean_over_clients(scores), missing)
    nmoe = {pid: {k: v for k, v in m.items() if ORACLE_PREFIX not in k} for pid, m in per_client.items()}
    rec.result("nmoe", nmoe, mean_over_clients(nmoe, NMOE_KEYS), missing)
    rec.save()
    run_baselines(fed, rec)


_NMOE_KEYS = (ACCURACY, MACRO_F1, ROUTED_TO_NEIGHBOUR, BYTES_PER_SAMPLE, MINORITY_TO_OWNER, DOMINANT_SENT_AWAY)
NMOE_KEYS = _NMOE_KEYS + tuple(IID_PREFIX + k for k in _NMOE_KEYS)
"""What the NMoE row of results.json averages over clients (both test settings)."""

ORACLE_ROUTINGS = ("class-owner", "best-expert")
"""Oracle routings the clients score (:func:`nmoe_flwr.algorithms.routing.oracle_predictions`)."""


def train_experts(
    fed: Federation, rec: RunRecorder, extractor: ArrayRecord
) -> tuple[dict[int, dict], dict[int, np.ndarray]]:
    """Stage 2: every client trains its expert on latents of ``extractor``.

    Returns
    -------
    bank, support
        ``{partition id: expert state}`` and ``{partition id: (C,) training
        samples per class}`` (what :func:`~nmoe_flwr.algorithms.candidates.choose_candidates` reads).
    """
    checkpoint = StageCheckpoint(rec.folder, BANK_STAGE)
    saved = load_bank(checkpoint) if fed.cfg.resume and rec.has("results", "personalized-expert") else None
    if saved is not None:  # the clients still hold their cached latents on disk
        log(INFO, "Expert bank of %d experts taken from %s (stage 2 skipped)", len(saved[0]), checkpoint.path)
        return saved
    missing: dict[int, str] = {}
    replies = rec.timed("stage2-experts", lambda: fed.broadcast(weights_message(extractor), MSG_EXPERT, missing))
    bank = {pid: from_record(reply[ARRAYS]) for pid, reply in replies.items()}
    metrics = metrics_of(replies)
    support = {pid: class_support(m, fed.num_classes) for pid, m in metrics.items()}
    metrics = {pid: {k: v for k, v in m.items() if not k.startswith(CLASS_SUPPORT_PREFIX)} for pid, m in metrics.items()}
    save_bank(checkpoint, bank, support)
    own = {pid: strip_prefix(m, EXPERT_METRIC_PREFIX) for pid, m in metrics.items()}
    # A lost expert is left out of the bank: the gates mask it and routing never picks it.
    rec.stage_details("experts", {"per-client": {str(k): v for k, v in metrics.items()},
                                  "missing": {str(k): v for k, v in sorted(missing.items())}})
    rec.result("personalized-expert", own, mean_over_clients(own), missing=missing)
    rec.save()
    return bank, support


def class_support(metrics: dict[str, float], num_classes: int) -> np.ndarray:
    """``(C,)`` training samples per class from a stage-2 reply's ``class-support-<c>`` metrics."""
    return np.array([metrics.get(f"{CLASS_SUPPORT_PREFIX}{c}", 0) for c in range(num_classes)], dtype=np.int64)


def send_bank(fed: Federation, rec: RunRecorder, bank: dict[int, dict], support: dict[int, np.ndarray]) -> None:
    """Stage 3 set-up: every client gets the frozen experts its gate may route to.

    With ``gate-candidates = 0`` (the paper) that is the whole bank, the same
    message for everyone; with ``k`` each client gets its own expert and
    ``k - 1`` class specialists (:func:`~nmoe_flwr.algorithms.candidates.choose_candidates`),
    recorded in results.json (``stages.gate-candidates``). The others are
    absent on the client, so its gate masks them (as a lost expert).
    """
    k = fed.cfg.gate_candidates
    if k and not set(bank) <= set(support):  # a bank resumed from a run that did not record it
        log(WARNING, "gate-candidates = %d but the experts' class support is not recorded: sending the whole bank", k)
        k = 0
    if not k or k >= len(bank):
        rec.timed("stage3-send-bank", lambda: fed.broadcast(RecordDict({EXPERT_BANK: bank_to_record(bank)}), MSG_EXPERT_BANK))
        return
    # A client whose own expert was lost (and with it its support) still routes: k others, classes in id order.
    everyone = {pid: support.get(pid, np.zeros(fed.num_classes, dtype=np.int64)) for pid in fed.pids.values()}
    candidates = choose_candidates(everyone, k, derive_seed(fed.cfg.seed, "gate-candidates"), experts=bank.keys())
    contents = {pid: RecordDict({EXPERT_BANK: bank_to_record({j: bank[j] for j in c})}) for pid, c in candidates.items()}
    rec.timed("stage3-send-bank", lambda: fed.send(contents, MSG_EXPERT_BANK))
    load = np.bincount([j for c in candidates.values() for j in c], minlength=len(fed.pids))
    log(INFO, "Gate candidates: %d experts per client; an expert is a candidate of %d to %d clients",
        k, int(load[list(bank)].min()), int(load.max()))
    rec.stage_details("gate-candidates", {"k": k, "per-client": {str(p): c for p, c in sorted(candidates.items())}})


def train_gates(fed: Federation, rec: RunRecorder, bank: dict[int, dict], support: dict[int, np.ndarray]) -> ArrayRecord:
    """Stage 3: send the frozen bank (:func:`send_bank`), then federated gate
    training by ``gate-method``; returns the averaged gate entries."""
    cfg = fed.cfg
    send_bank(fed, rec, bank, support)
    prefixes = GATE_SHARED_PREFIXES[cfg.gate_method]
    init = new_gate(cfg.mlp_hidden, cfg.num_clients, derive_seed(cfg.seed, "gate-init")).state_dict()
    checkpoint = StageCheckpoint(rec.folder, "gate")
    # A gate layer that stays local is only trained by its own client: with partial participation some
    # clients would route with an untrained decision layer, so such gates train on every client each round.
    fraction = cfg.fraction_train if GATE_DECISION_PREFIX in prefixes else 1.0
    if fraction != cfg.fraction_train:
        log(INFO, "gate-method = %s keeps layers local: every client trains its gate each round (fraction-train %.2f is "
            "for shared models)", cfg.gate_method, cfg.fraction_train)
    gate, rounds, missing = rec.timed(
        "stage3-gate", lambda: fed.partial_fedavg(init, prefixes, MSG_GATE, cfg.gate_rounds, checkpoint,
                                                  fraction_train=fraction)
    )
    rec.add_rounds("gate", rounds)
    rec.stage_details("gate", {"method": cfg.gate_method, "shared-prefixes": list(prefixes), "rounds": rounds,
                               "missing-replies": missing})
    return gate
