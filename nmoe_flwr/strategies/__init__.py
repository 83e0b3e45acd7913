"""Message-API strategies that plug into any Flower ServerApp."""

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
