"""From the run config to every client's data, and one client's data cached on its disk.

Every node computes the same partition from the same config and keeps its own
part, so no index lists travel between server and clients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .images import ImageSet, subset
from .partition import partition_indices
from .sources import load_hf_split, load_split_cached, resolve_data_dir

# How clients' test sets are drawn: like their training sets, or IID.
TEST_DISTRIBUTIONS = ("same", "iid")


@dataclass(frozen=True)
class ClientSplits:
    """One client's local training and test data.

    Attributes
    ----------
    train : ImageSet
        Labelled training samples.
    test : ImageSet
        Test samples, disjoint from every client's training samples.
    unlabeled : ImageSet or None
        Extra training samples that only self-supervised training may use
        (their labels stay in memory but must not be read); ``None`` when the
        run asks for none.
    test_iid : ImageSet or None
        The paper's second test setting when ``test`` follows the client's
        own skewed distribution: an IID test set of the same size (the test
        set does not change training, so both settings are scored in one
        run); ``None`` when ``test`` is IID already.
    """

    train: ImageSet
    test: ImageSet
    unlabeled: ImageSet | None = None
    test_iid: ImageSet | None = None


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
    clients: Sequence[int] | None = None,
) -> list[ClientSplits]:
    """Build every client's train/test data (or only the named clients').

    Training data follow ``partition`` (``"iid"`` or ``"dominant"``) with
    ``tau`` and ``seed``.  Test data follow the same scheme when
    ``test_distribution == "same"`` (each client is tested on its own
    distribution) or ``"iid"`` when ``test_distribution == "iid"``, drawn with
    ``seed + 1`` so the random stream differs from the training one.
    ``unlabeled_per_client`` extra training samples per client (same scheme,
    ``seed + 2``) come from the training samples left over by the labelled
    partition; they carry labels in memory but only self-supervised stages
    may use them. When the test data are skewed (``"same"`` with a
    ``"dominant"`` partition), every client also gets an IID test set
    (``seed + 3``, disjoint between clients, independent of the first).

    Parameters
    ----------
    train, test : ImageSet
        The full training and test splits.
    num_clients, train_per_client, test_per_client : int
        Number of clients and samples each gets per split.
    partition : {"iid", "dominant"}
    tau : float
        Non-dominant share, as for :func:`~nmoe_flwr.data.partition.class_counts`.
    test_distribution : {"same", "iid"}
    seed : int
        Seed of the training partition; the same arguments always give the
        same result.
    unlabeled_per_client : int, optional
        Extra unlabelled samples per client, 0 (default) for none.
    clients : sequence of int, optional
        Build only these clients' splits, in this order (default: all).  The
        partition is still drawn for every client (index arrays are cheap), so
        a client's split does not depend on who else is built; gathering only
        its own images keeps a node's start-up O(its data), not O(all data).

    Returns
    -------
    list of ClientSplits
        One per client in ``clients`` (default: every client, in client order).  Clients' sets are pairwise disjoint
        within each split, and each client's unlabelled samples are disjoint
        from every client's labelled ones.

    Raises
    ------
    ValueError
        Unknown ``test_distribution``, a client outside ``range(num_clients)``,
        or any error of ``partition_indices``.
    """
    if test_distribution not in TEST_DISTRIBUTIONS:
        raise ValueError(
            f"unknown test_distribution {test_distribution!r}; allowed: {list(TEST_DISTRIBUTIONS)}"
        )
    wanted = list(range(num_clients)) if clients is None else [int(c) for c in clients]
    if any(not 0 <= c < num_clients for c in wanted):
        raise ValueError(f"clients {wanted} outside range({num_clients})")
    built = set(wanted)
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
        unlabeled = [subset(train, pool[pool_idx[c]]) if c in built else None for c in range(num_clients)]
    iid_tests: list[ImageSet | None] = [None] * num_clients
    if test_scheme != "iid":
        iid_idx = partition_indices(test.labels.numpy(), num_clients, test_per_client, "iid", tau, seed + 3)
        iid_tests = [subset(test, iid_idx[c]) if c in built else None for c in range(num_clients)]
    return [
        ClientSplits(subset(train, train_idx[c]), subset(test, test_idx[c]), unlabeled[c], iid_tests[c])
        for c in wanted
    ]


def load_dataset(dataset: str, data_dir: str, hf_dataset: str, cache: Path | None) -> tuple[ImageSet, ImageSet]:
    """The full train and test splits named by the run config.

    Parameters
    ----------
    dataset : str
        A local data set registered in ``DATASETS``.
    data_dir : str
        The run config's ``data-dir``; ``""`` falls back as in
        :func:`~nmoe_flwr.data.sources.resolve_data_dir`.
    hf_dataset : str
        A Hugging Face id (optional extra, needs internet); when non-empty it
        wins over ``dataset`` and ``data_dir``.
    cache : Path or None
        Folder for decoded local splits, reused by later calls; ``None``
        decodes every time.

    Returns
    -------
    tuple of ImageSet
        The ``(train, test)`` splits.

    Raises
    ------
    ValueError
        Unknown ``dataset``.
    DataError
        Missing or corrupt data, or a Hugging Face data set without the extra.
    """
    if hf_dataset:
        return load_hf_split(hf_dataset, "train"), load_hf_split(hf_dataset, "test")
    root = resolve_data_dir(dataset, data_dir)
    return (
        load_split_cached(dataset, "train", root, cache),
        load_split_cached(dataset, "test", root, cache),
    )


def all_client_splits(cfg, cache: Path | None, clients: Sequence[int] | None = None) -> list[ClientSplits]:
    """Every client's train/test split for ``cfg`` (a :class:`~nmoe_flwr.config.RunConfig`),
    or only the named clients'.

    A pure function of the config (and the data files): every node computes
    the same partition and keeps its own part, so no index lists travel.

    Parameters
    ----------
    cfg : RunConfig
        Read for the data set, its folder and the partition keys.
    cache : Path or None
        As for :func:`load_dataset`.
    clients : sequence of int, optional
        As for :func:`make_client_splits` (a node passes its own partition id).

    Returns
    -------
    list of ClientSplits
        One split per client (all ``cfg.num_clients`` by default), as made by
        :func:`make_client_splits`.

    Raises
    ------
    ValueError, DataError
        As for :func:`load_dataset` and :func:`make_client_splits`.
    """
    train, test = load_dataset(cfg.dataset, cfg.data_dir, cfg.hf_dataset, cache)
    return make_client_splits(
        train, test,
        num_clients=cfg.num_clients, train_per_client=cfg.train_per_client,
        test_per_client=cfg.test_per_client, partition=cfg.partition, tau=cfg.tau,
        test_distribution=cfg.test_distribution, seed=cfg.seed,
        unlabeled_per_client=cfg.unlabeled_per_client, clients=clients,
    )
