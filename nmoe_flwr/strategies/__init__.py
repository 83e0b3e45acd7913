"""Message-API strategies that plug into any Flower ServerApp.

Thin subclasses of Flower's ``FedAvg``, each documenting its client
contract: :class:`PartialFedAvg` (FedAvg over named parameter prefixes:
FedGate, FedCE with a local head), :class:`FedSC` (correlation matrices
first, then training against them) and :class:`ExpertAssignment`
(capacity-aware client–expert alignment for a global MoE).

May import flwr, numpy, :mod:`nmoe_flwr.constants`, :mod:`nmoe_flwr.capacity`
and :mod:`nmoe_flwr.algorithms` (the pure aggregation and assignment maths).
The import path ``nmoe_flwr.strategies`` is public and stable.
"""

from .expert_assignment import ExpertAssignment, RoundLog, aggregate_experts
from .fedsc import CorrelationEntry, FedSC, external_correlation
from .partial_fedavg import PartialFedAvg, split_shared

__all__ = [
    "CorrelationEntry",
    "ExpertAssignment",
    "FedSC",
    "PartialFedAvg",
    "RoundLog",
    "aggregate_experts",
    "external_correlation",
    "split_shared",
]
