"""Data sets and federated client splits for nmoe_flwr."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .partition import class_counts, partition_indices
from .sources import (
    DataError,
    ImageSet,
    load_hf_split,
    load_split,
    load_split_cached,
    resolve_data_dir,
)

__all__ = [
    "ClientSplits",
    "DataError",
    "ImageSet",
    "class_counts",
    "load_hf_split",
    "load_split",
    "load_split_cached",
    "make_client_splits",
    "partition_indices",
    "resolve_data_dir",
    "subset",
]

TEST_DISTRIBUTIONS = ("same", "iid")


def subset(data: ImageSet, idx: np.ndarray) -> ImageSet:
    """Return the samples of ``data`` at positions ``idx`` (a copy), in that order."""
    index = torch.as_tensor(np.asarray(idx, dtype=np.int64))
    return ImageSet(data.images[index], data.labels[index], data.num_classes)


@dataclass(frozen=True)
class ClientSplits:
    """One client's local training and test data."""

    train: ImageSet
    test: ImageSet
    unlabeled: ImageSet | None = None  # extra samples only self-supervised training sees


def make_client_splits(
    train: ImageSet,
    test: ImageSet,
    *,
    num_clients: int,
    train_per_client: int,
    test_per_client: int,
    partition: str,
    tau: float,
    test_distribution: str,
    seed: int,
    unlabeled_per_client: int = 0,
) -> list[ClientSplits]:
    """Build every client's train/test data.

    Training data follow ``partition`` (``"iid"`` or ``"dominant"``) with
    ``tau`` and ``seed``.  Test data follow the same scheme when
    ``test_distribution == "same"`` (each client is tested on its own
    distribution) or ``"iid"`` when ``test_distribution == "iid"``, drawn with
    ``seed + 1`` so the random stream differs from the training one.
    ``unlabeled_per_client`` extra training samples per client (same scheme,
    ``seed + 2``) come from the training samples left over by the labelled
    partition; they carry labels in memory but only self-supervised stages
    may use them.  Clients'
    sets are pairwise disjoint within each split.

    Raises
    ------
    ValueError
        Unknown ``test_distribution``, or any error of ``partition_indices``.
    """
    if test_distribution not in TEST_DISTRIBUTIONS:
        raise ValueError(
            f"unknown test_distribution {test_distribution!r}; allowed: {list(TEST_DISTRIBUTIONS)}"
        )
    train_idx = partition_indices(
        train.labels.numpy(), num_clients, train_per_client, partition, tau, seed
    )
    test_scheme = partition if test_distribution == "same" else "iid"
    test_idx = partition_indices(
        test.labels.numpy(), num_clients, test_per_client, test_scheme, tau, seed + 1
    )
    unlabeled: list[ImageSet | None] = [None] * num_clients
    if unlabeled_per_client > 0:
        # Drawn from the training samples no client got as labelled data, with the
        # client's own class mix, so labelled, unlabelled and test sets are disjoint.
        pool = np.setdiff1d(np.arange(len(train)), np.concatenate(train_idx))
        pool_idx = partition_indices(
            train.labels.numpy()[pool], num_clients, unlabeled_per_client, partition, tau, seed + 2
        )
        unlabeled = [subset(train, pool[i]) for i in pool_idx]
    return [
        ClientSplits(subset(train, a), subset(test, b), u)
        for a, b, u in zip(train_idx, test_idx, unlabeled)
    ]
