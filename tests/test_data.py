"""Tests for nmoe_flwr.data: loaders, cache and non-IID partitions."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from nmoe_flwr.data import (
    ClientSplits,
    DataError,
    ImageSet,
    class_counts,
    load_split,
    load_split_cached,
    make_client_splits,
    partition_indices,
    resolve_data_dir,
    subset,
)

REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


# --- helpers -----------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def write_fmnist(folder: Path, split: str = "test", n: int = 7, gz: bool = True, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    prefix = "train" if split == "train" else "t10k"
    folder.mkdir(parents=True, exist_ok=True)
    for stem, arr in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        data = idx_bytes(arr)
        if gz:
            (folder / (stem + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return images, labels


def write_cifar(folder: Path, n: int = 20):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        batch = {b"batch_label": name.encode(), b"data": data, b"labels": labels}
        # Protocol 4 stores bytes natively and arrays via _reconstruct, like the
        # official (Python 2, protocol 2) files once read with encoding="bytes".
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
        batches[name] = (data, labels)
    return batches


# --- Fashion-MNIST -----------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_fmnist_roundtrip(tmp_path, gz):
    images, labels = write_fmnist(tmp_path, "train", gz=gz)
    ds = load_split("fashion-mnist", "train", tmp_path)
    assert isinstance(ds, ImageSet) and len(ds) == 7 and ds.num_classes == 10
    assert ds.images.shape == (7, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.labels.dtype == torch.int64
    assert np.array_equal(ds.images[:, 0].numpy(), images)
    assert np.array_equal(ds.labels.numpy(), labels)


def test_fmnist_bad_magic(tmp_path):
    write_fmnist(tmp_path, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    raw = bytearray(path.read_bytes())
    raw[2] = 0x0D  # float dtype code
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="magic") as err:
        load_split("fashion-mnist", "test", tmp_path)
    assert str(path) in str(err.value)


def test_fmnist_truncated(tmp_path):
    write_fmnist(tmp_path, gz=True)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-2]))
    with pytest.raises(DataError) as err:
        load_split("fashion-mnist", "test", tmp_path)
    assert str(path) in str(err.value)


def test_fmnist_count_mismatch(tmp_path):
    write_fmnist(tmp_path, gz=False, n=7)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(6, np.uint8)))
    with pytest.raises(DataError, match="6 labels for 7 images"):
        load_split("fashion-mnist", "test", tmp_path)


def test_fmnist_missing_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as err:
        load_split("fashion-mnist", "test", missing)
    assert str(missing) in str(err.value)


def test_unknown_dataset_and_split(tmp_path):
    with pytest.raises(ValueError, match="mnist.*allowed"):
        load_split("mnist", "test", tmp_path)
    with pytest.raises(ValueError, match="valid"):
        load_split("fashion-mnist", "valid", tmp_path)


# --- CIFAR-10 ----------------------------------------------------------------


def test_cifar_roundtrip(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    batches = write_cifar(folder)
    train = load_split("cifar10", "train", folder)
    test = load_split("cifar10", "test", folder)
    assert train.images.shape == (100, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (20, 3, 32, 32) and len(test) == 20
    data, labels = batches["data_batch_1"]
    assert np.array_equal(train.images[0, 0].numpy(), data[0, :1024].reshape(32, 32))
    assert np.array_equal(train.images[0, 2].numpy(), data[0, 2048:].reshape(32, 32))
    assert train.labels[:20].tolist() == labels
    assert test.labels.tolist() == batches["test_batch"][1]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_forbidden_global(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    bad = folder / "test_batch"
    bad.write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}, protocol=4))
    with pytest.raises(DataError, match="forbidden global") as err:
        load_split("cifar10", "test", folder)
    assert str(bad) in str(err.value)


def test_cifar_missing(tmp_path):
    with pytest.raises(DataError, match="cifar-10-python.tar.gz"):
        load_split("cifar10", "train", tmp_path / "nope")
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_split("cifar10", "train", folder)


def test_cifar_wrong_shape(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    bad = {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}
    (folder / "test_batch").write_bytes(pickle.dumps(bad, protocol=4))
    with pytest.raises(DataError, match="3072"):
        load_split("cifar10", "test", folder)


# --- data dir and cache ------------------------------------------------------


def test_resolve_data_dir(monkeypatch):
    monkeypatch.delenv("NMOE_DATA_DIR", raising=False)
    assert resolve_data_dir("fashion-mnist") == REAL_FMNIST
    assert resolve_data_dir("cifar10") == Path("data/cifar-10-batches-py")
    monkeypatch.setenv("NMOE_DATA_DIR", "/from/env")
    assert resolve_data_dir("fashion-mnist") == Path("/from/env")
    assert resolve_data_dir("fashion-mnist", "/from/config") == Path("/from/config")
    with pytest.raises(ValueError, match="'svhn'.*cifar10"):
        resolve_data_dir("svhn")


def test_cached_matches_and_skips_source(tmp_path):
    src, cache = tmp_path / "src", tmp_path / "cache"
    write_fmnist(src, "test")
    direct = load_split("fashion-mnist", "test", src)
    first = load_split_cached("fashion-mnist", "test", src, cache)
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 and all(f.endswith(".npy") for f in files)
    assert torch.equal(first.images, direct.images) and torch.equal(first.labels, direct.labels)

    # Corrupting the payload while keeping path, size and mtime proves the
    # second call reads the cache, not the source.
    img = src / "t10k-images-idx3-ubyte.gz"
    st = img.stat()
    img.write_bytes(b"\0" * st.st_size)
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = load_split_cached("fashion-mnist", "test", src, cache)
    assert torch.equal(second.images, direct.images) and torch.equal(second.labels, direct.labels)
    assert second.num_classes == 10

    # A changed mtime invalidates the key, so the corrupt source is read.
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(DataError):
        load_split_cached("fashion-mnist", "test", src, cache)


def test_cache_none_is_plain_load(tmp_path):
    write_fmnist(tmp_path, "test")
    assert torch.equal(
        load_split_cached("fashion-mnist", "test", tmp_path, None).images,
        load_split("fashion-mnist", "test", tmp_path).images,
    )


@pytest.mark.skipif(not REAL_FMNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_test_split():
    ds = load_split("fashion-mnist", "test", REAL_FMNIST)
    assert ds.images.shape == (10000, 1, 28, 28)
    assert np.bincount(ds.labels.numpy(), minlength=10).tolist() == [1000] * 10


# --- partitions --------------------------------------------------------------


def test_class_counts_by_hand():
    assert class_counts("iid", 0.5, 1000, 10, 4).tolist() == [100] * 10
    assert class_counts("iid", 0.5, 13, 10, 8).tolist() == [2, 1, 1, 1, 1, 1, 1, 1, 2, 2]
    c0 = class_counts("dominant", 0.1, 1000, 10, 0)
    assert c0.tolist() == [900, 12] + [11] * 8 and c0.dtype == np.int64
    c3 = class_counts("dominant", 0.1, 1000, 10, 3)
    assert int(np.argmax(c3)) == 3 and c3[4] == 12 and c3.sum() == 1000
    assert class_counts("dominant", 0.9, 1000, 10, 0).tolist() == [100] * 10
    assert class_counts("dominant", 0.3, 77, 10, 13).sum() == 77


@pytest.mark.parametrize(
    "args, match",
    [
        (("dominant", 0.0, 10, 10, 0), "tau"),
        (("dominant", 1.0, 10, 10, 0), "tau"),
        (("pathological", 0.5, 10, 10, 0), "'pathological'.*iid.*dominant"),
    ],
)
def test_class_counts_invalid(args, match):
    with pytest.raises(ValueError, match=match):
        class_counts(*args)


def synthetic_labels(per_class: int, num_classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


def test_partition_exact_and_disjoint():
    labels = synthetic_labels(1200)
    tau, per_client, clients = 0.2, 900, 8
    parts = partition_indices(labels, clients, per_client, "dominant", tau, seed=5)
    assert len(parts) == clients
    everything = np.concatenate(parts)
    assert len(np.unique(everything)) == len(everything) == clients * per_client
    for k, idx in enumerate(parts):
        assert idx.dtype == np.int64 and len(idx) == per_client
        counts = np.bincount(labels[idx], minlength=10)
        assert np.array_equal(counts, class_counts("dominant", tau, per_client, 10, k))
        assert abs(counts[k % 10] / per_client - (1 - tau)) <= 1 / per_client
        assert not np.all(np.diff(labels[idx]) >= 0)  # shuffled, not grouped by class


def test_partition_deterministic():
    labels = synthetic_labels(300)
    a = partition_indices(labels, 5, 200, "iid", 0.5, seed=1)
    b = partition_indices(labels, 5, 200, "iid", 0.5, seed=1)
    c = partition_indices(labels, 5, 200, "iid", 0.5, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_partition_not_enough_samples():
    labels = synthetic_labels(80)
    # class 0: 90 as client 0's dominant class + 1 each from clients 1 and 2.
    with pytest.raises(ValueError, match=r"class 0: .*need 92 .*only 80.*fewer clients"):
        partition_indices(labels, 3, 100, "dominant", 0.1, seed=0)


def test_balanced_rotation_uses_every_sample():
    labels = synthetic_labels(1000)
    parts = partition_indices(labels, 10, 1000, "dominant", 0.1, seed=0)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(10000))


# --- client splits -----------------------------------------------------------


def fake_set(per_class: int) -> ImageSet:
    labels = synthetic_labels(per_class)
    images = torch.arange(len(labels), dtype=torch.int64).remainder(256).to(torch.uint8)
    return ImageSet(images.view(-1, 1, 1, 1).repeat(1, 1, 2, 2), torch.from_numpy(labels), 10)


def test_subset_keeps_order():
    data = fake_set(3)
    sub = subset(data, np.array([4, 0, 7]))
    assert sub.labels.tolist() == data.labels[[4, 0, 7]].tolist() and sub.num_classes == 10
    assert torch.equal(sub.images, data.images[[4, 0, 7]])


@pytest.mark.parametrize("test_distribution", ["same", "iid"])
def test_make_client_splits(test_distribution):
    train, test = fake_set(100), fake_set(40)
    splits = make_client_splits(
        train, test, num_clients=4, train_per_client=100, test_per_client=40,
        partition="dominant", tau=0.1, test_distribution=test_distribution, seed=3,
    )
    assert len(splits) == 4 and all(isinstance(s, ClientSplits) for s in splits)
    for k, s in enumerate(splits):
        assert len(s.train) == 100 and len(s.test) == 40
        assert np.bincount(s.train.labels.numpy(), minlength=10)[k] == 90
        test_counts = np.bincount(s.test.labels.numpy(), minlength=10)
        expected = 36 if test_distribution == "same" else 4
        assert test_counts[k] == expected
    with pytest.raises(ValueError, match="test_distribution"):
        make_client_splits(
            train, test, num_clients=4, train_per_client=100, test_per_client=40,
            partition="dominant", tau=0.1, test_distribution="skewed", seed=3,
        )
