"""Message-API strategies that plug into any Flower ServerApp."""

from .expert_assignment import ExpertAssignment, RoundLog, aggregate_experts
from .fedsc import CorrelationEntry, FedSC, external_correlation
from .partial_fedavg import PartialFedAvg, split_shared

__all__ = [
    "ExpertAssignment",
    "RoundLog",
    "aggregate_experts",
    "CorrelationEntry", "FedSC", "PartialFedAvg", "external_correlation", "split_shared"]
