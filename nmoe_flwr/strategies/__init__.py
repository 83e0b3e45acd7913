"""Message-API strategies that plug into any Flower ServerApp."""

from .partial_fedavg import PartialFedAvg, split_shared

__all__ = ["PartialFedAvg", "split_shared"]
