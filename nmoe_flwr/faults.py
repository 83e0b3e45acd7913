"""Fault injection for simulation: clients that drop out or straggle, seeded.

With ``fault-drop-rate`` = p a client fails a training message (every round
of FedCE, FedSC and the gate, its stage-2 expert, an alignment round) with
probability p: the ClientApp raises :class:`InjectedFault` and Flower sends
the server an error reply. With ``fault-straggler-rate`` = q it instead
answers ``round-timeout + 2`` seconds late, so the server has moved on and
the reply is missing. The draw depends only on (seed, partition, stage,
round): a run is reproducible and two runs with the same seed lose the same
clients. Off by default; evaluation messages are never faulted (the run
reports what the faults did to training).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Literal

import torch

from .algorithms.seeding import derive_seed

if TYPE_CHECKING:
    from .config import RunConfig

Fault = Literal["drop", "straggle"]


class InjectedFault(RuntimeError):
    """A simulated client failure (``fault-drop-rate``)."""


def fault_of(seed: int, partition_id: int, stage: str, server_round: int, drop: float, straggle: float) -> Fault | None:
    """The fault this client suffers in this stage and round, or ``None``.

    One uniform draw ``u`` per (seed, partition, stage, round): ``u < drop``
    is a drop-out, ``drop <= u < drop + straggle`` a straggler.
    """
    if drop <= 0 and straggle <= 0:
        return None
    g = torch.Generator().manual_seed(derive_seed(seed, partition_id, "fault", stage, server_round))
    u = float(torch.rand((), generator=g))
    if u < drop:
        return "drop"
    if u < drop + straggle:
        return "straggle"
    return None


def inject(cfg: RunConfig, partition_id: int, stage: str, server_round: int, sleep=time.sleep) -> None:
    """Apply the configured fault, if any: raise :class:`InjectedFault` or sleep past the round timeout."""
    fault = fault_of(cfg.seed, partition_id, stage, server_round, cfg.fault_drop_rate, cfg.fault_straggler_rate)
    if fault == "drop":
        raise InjectedFault(f"injected drop-out of partition {partition_id} in {stage} round {server_round} "
                            f"(fault-drop-rate = {cfg.fault_drop_rate:g})")
    if fault == "straggle":
        sleep(cfg.round_timeout + 2.0)
