"""From the run config to one client's data, cached on the client's disk."""

from __future__ import annotations

from pathlib import Path

import torch

from . import (
    ClientSplits,
    ImageSet,
    load_hf_split,
    load_split_cached,
    make_client_splits,
    resolve_data_dir,
)


def load_dataset(dataset: str, data_dir: str, hf_dataset: str, cache: Path | None) -> tuple[ImageSet, ImageSet]:
    """The full train and test splits named by the run config.

    ``hf-dataset`` (a Hugging Face id, optional extra, needs internet) wins
    over ``dataset``; local sources are decoded once into ``cache``.
    """
    if hf_dataset:
        return load_hf_split(hf_dataset, "train"), load_hf_split(hf_dataset, "test")
    root = resolve_data_dir(dataset, data_dir)
    return (
        load_split_cached(dataset, "train", root, cache),
        load_split_cached(dataset, "test", root, cache),
    )


def all_client_splits(cfg, cache: Path | None) -> list[ClientSplits]:
    """Every client's train/test split for ``cfg`` (a :class:`~nmoe_flwr.config.RunConfig`).

    A pure function of the config: every node computes the same partition
    and keeps its own part, so no index lists travel.
    """
    train, test = load_dataset(cfg.dataset, cfg.data_dir, cfg.hf_dataset, cache)
    return make_client_splits(
        train, test,
        num_clients=cfg.num_clients, train_per_client=cfg.train_per_client,
        test_per_client=cfg.test_per_client, partition=cfg.partition, tau=cfg.tau,
        test_distribution=cfg.test_distribution, seed=cfg.seed,
        unlabeled_per_client=cfg.unlabeled_per_client,
    )


def client_splits(cfg, partition_id: int, workdir: Path, cache: Path | None) -> ClientSplits:
    """One client's split, loaded from ``workdir/data.pt`` after the first call.

    Decoding and partitioning the full data set costs about a second; the
    client's own part is a few hundred kB, so later stages read that.
    """
    path = workdir / "data.pt"
    if path.exists():
        blob = torch.load(path, weights_only=True)
        c = int(blob["num_classes"])
        unlabeled = ImageSet(blob["unl_x"], blob["unl_y"], c) if "unl_x" in blob else None
        return ClientSplits(ImageSet(blob["train_x"], blob["train_y"], c), ImageSet(blob["test_x"], blob["test_y"], c), unlabeled)
    split = all_client_splits(cfg, cache)[partition_id]
    blob = {
        "train_x": split.train.images, "train_y": split.train.labels,
        "test_x": split.test.images, "test_y": split.test.labels,
        "num_classes": split.train.num_classes,
    }
    if split.unlabeled is not None:
        blob |= {"unl_x": split.unlabeled.images, "unl_y": split.unlabeled.labels}
    tmp = path.with_suffix(".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)
    return split
