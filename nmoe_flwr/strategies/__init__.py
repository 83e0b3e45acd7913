"""Message-API strategies that plug into any Flower ServerApp."""

from .fedsc import CorrelationEntry, FedSC, external_correlation
from .partial_fedavg import PartialFedAvg, split_shared

__all__ = ["CorrelationEntry", "FedSC", "PartialFedAvg", "external_correlation", "split_shared"]
