"""Message-API strategies that plug into any Flower ServerApp.

Thin subclasses of Flower's ``FedAvg``, each documenting its client
contract: :class:`PartialFedAvg` (FedAvg over named parameter prefixes:
FedGate, FedCE with a local head), :class:`FedSC` (correlation matrices
first, then training against them) and :class:`ExpertAssignment`
(capacity-aware client–expert alignment for a global MoE); and
:class:`RestartAwareGrid`, a Grid wrapper that does not wait for a node which
restarted while its message was in flight.

May import flwr, numpy, :mod:`nmoe_flwr.constants`, :mod:`nmoe_flwr.capacity`
and :mod:`nmoe_flwr.algorithms` (the pure aggregation and assignment maths).
The import path ``nmoe_flwr.strategies`` is public and stable.
"""

from .expert_assignment import ExpertAssignment, RoundLog, aggregate_experts
from .fedsc import CorrelationEntry, FedSC, external_correlation
from .partial_fedavg import PartialFedAvg, split_shared
from .restart_watch import RestartAwareGrid

__all__ = [
    "CorrelationEntry",
    "ExpertAssignment",
    "FedSC",
    "PartialFedAvg",
    "RestartAwareGrid",
    "RoundLog",
    "aggregate_experts",
    "external_correlation",
    "split_shared",
]
