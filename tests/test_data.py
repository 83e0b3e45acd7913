"""Tests for nmoe_flwr.data: registry, loaders, cache and non-IID partitions."""

from __future__ import annotations

import ast
import gzip
import hashlib
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import nmoe_flwr.data as data_pkg
from nmoe_flwr.data import (
    DATASETS,
    ClientSplits,
    DataError,
    DatasetSpec,
    ImageSet,
    PixelStats,
    class_counts,
    dataset_spec,
    load_split,
    load_split_cached,
    make_client_splits,
    partition_indices,
    pixel_stats_for,
    resolve_data_dir,
    subset,
)
from nmoe_flwr.data.formats import SourceError

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


def write_cifar(folder: Path, n: int = 20, protocol: int = 4):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        batch = {b"batch_label": name.encode(), b"data": data, b"labels": labels}
        # Protocol 4 stores bytes natively and arrays via _reconstruct, like the
        # official (Python 2, protocol 2) files once read with encoding="bytes".
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
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


def test_cifar_written_by_python3_protocol_2_loads(tmp_path):
    """Python 3's protocol 2 pickles bytes through _codecs.encode; issue 12 found those refused."""
    folder = tmp_path / "cifar-10-batches-py"
    batches = write_cifar(folder, protocol=2)
    test = load_split("cifar10", "test", folder)
    data, labels = batches["test_batch"]
    np.testing.assert_array_equal(test.images.numpy().reshape(len(labels), -1), data)
    assert test.labels.tolist() == labels


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


def test_one_clients_split_equals_its_entry_in_all():
    """A node builds only its own split; it must be the one the full partition gives it."""
    train, test = fake_set(100), fake_set(40)
    kw = {"num_clients": 4, "train_per_client": 60, "test_per_client": 20, "partition": "dominant", "tau": 0.2,
          "test_distribution": "same", "seed": 5, "unlabeled_per_client": 10}
    every = make_client_splits(train, test, **kw)
    some = make_client_splits(train, test, clients=[2, 0], **kw)
    for got, want in zip(some, [every[2], every[0]]):
        for part in ("train", "test", "unlabeled", "test_iid"):
            a, b = getattr(got, part), getattr(want, part)
            assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels), part
    with pytest.raises(ValueError, match="outside range"):
        make_client_splits(train, test, clients=[4], **kw)


# --- unchanged error texts and cache names -----------------------------------

FMNIST_HINT = (
    "install it with `apt-get install dataset-fashion-mnist` or set NMOE_DATA_DIR / "
    "the run-config key data-dir to a folder with the IDX files"
)
CIFAR_HINT = (
    "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, extract it "
    "and point data-dir / NMOE_DATA_DIR at the cifar-10-batches-py folder"
)


@pytest.mark.parametrize("cached", [False, True])
def test_fmnist_missing_folder_message(tmp_path, cached):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        if cached:
            load_split_cached("fashion-mnist", "train", missing, tmp_path / "cache")
        else:
            load_split("fashion-mnist", "train", missing)
    assert str(err.value) == f"fashion-mnist: {missing}: folder not found; {FMNIST_HINT}"
    assert not (tmp_path / "cache").exists()


def test_source_error_messages_are_exact(tmp_path):
    write_fmnist(tmp_path / "fm", gz=False)
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(7, 12, np.uint8)))
    with pytest.raises(DataError) as err:
        load_split("fashion-mnist", "test", tmp_path / "fm")
    label_file = tmp_path / "fm" / "t10k-labels-idx1-ubyte"
    assert str(err.value) == f"fashion-mnist: {label_file}: label 12 out of range 0..9; {FMNIST_HINT}"

    write_fmnist(tmp_path / "fm2", gz=True)
    (tmp_path / "fm2" / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError) as err:
        load_split("fashion-mnist", "test", tmp_path / "fm2")
    stem = tmp_path / "fm2" / "t10k-images-idx3-ubyte"
    assert str(err.value) == f"fashion-mnist: {stem}: file not found (plain or .gz); {FMNIST_HINT}"

    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    bad = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}
    (folder / "test_batch").write_bytes(pickle.dumps(bad, protocol=4))
    with pytest.raises(DataError) as err:
        load_split("cifar10", "test", folder)
    assert str(err.value) == f"cifar10: {folder / 'test_batch'}: labels out of range 0..9; {CIFAR_HINT}"


def test_cache_names_and_key_unchanged(tmp_path):
    src, cache = tmp_path / "src", tmp_path / "cache"
    write_fmnist(src, "train")
    load_split_cached("fashion-mnist", "train", src, cache)
    # Changing this key format would silently re-decode every node's cache.
    h = hashlib.sha256(b"v1|fashion-mnist|train")
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        f, st = src / name, (src / name).stat()
        h.update(f"|{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    stem = f"fashion-mnist-train-{h.hexdigest()[:16]}"
    assert sorted(p.name for p in cache.iterdir()) == [f"{stem}-images.npy", f"{stem}-labels.npy"]


def test_cache_with_wrong_layout_is_decoded_again(tmp_path):
    src, cache = tmp_path / "src", tmp_path / "cache"
    images, _ = write_fmnist(src, "test")
    load_split_cached("fashion-mnist", "test", src, cache)
    img_cache = next(cache.glob("*-images.npy"))
    np.save(img_cache, np.zeros((7, 3, 28, 28), np.uint8))  # a readable array of the wrong shape
    with pytest.warns(UserWarning, match="ignoring unreadable cache.*decoded images"):
        ds = load_split_cached("fashion-mnist", "test", src, cache)
    assert np.array_equal(ds.images[:, 0].numpy(), images)
    assert np.load(img_cache).shape == (7, 1, 28, 28)  # rewritten


# --- registry ----------------------------------------------------------------


def test_registry_entries():
    fm, cf = DATASETS["fashion-mnist"], DATASETS["cifar10"]
    assert dataset_spec("fashion-mnist") is fm and dataset_spec("cifar10") is cf
    assert (fm.num_classes, fm.channels, fm.image_size) == (10, 1, (28, 28))
    assert (cf.num_classes, cf.channels, cf.image_size) == (10, 3, (32, 32))
    assert fm.pixel_stats == PixelStats((0.2860,), (0.3530,))
    assert cf.pixel_stats == PixelStats((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    assert fm.default_dir == "/usr/share/datasets/fashion-mnist"
    assert cf.default_dir == "data/cifar-10-batches-py"
    assert fm.hint == FMNIST_HINT and cf.hint == CIFAR_HINT
    assert all(name == spec.name for name, spec in DATASETS.items())


def test_dataset_spec_unknown_names_allowed(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown dataset 'nope'; allowed: \['cifar10', 'fashion-mnist'\]"):
        dataset_spec("nope")
    # The allowed list is the registry's, not a copy of it.
    monkeypatch.setitem(DATASETS, "aaa", DATASETS["cifar10"])
    with pytest.raises(ValueError, match=r"allowed: \['aaa', 'cifar10', 'fashion-mnist'\]"):
        dataset_spec("nope")


def test_pixel_stats_for():
    assert pixel_stats_for("fashion-mnist", "", 1) == PixelStats((0.2860,), (0.3530,))
    assert pixel_stats_for("cifar10", "", 3) == PixelStats(
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    )
    # A Hugging Face data set wins over ``dataset`` and gets neutral statistics,
    # never those of a local data set with the same channel count.
    assert pixel_stats_for("cifar10", "uoft-cs/cifar10", 3) == PixelStats.neutral(3)
    assert pixel_stats_for("fashion-mnist", "some/grey-set", 1) == PixelStats.neutral(1)
    assert pixel_stats_for("fashion-mnist", "some/rgb-set", 3) == PixelStats.neutral(3)
    with pytest.raises(ValueError, match="cifar10.*3 channels.*got 1"):
        pixel_stats_for("cifar10", "", 1)
    with pytest.raises(ValueError, match="fashion-mnist.*1 channels.*got 3"):
        pixel_stats_for("fashion-mnist", "", 3)
    with pytest.raises(ValueError, match="'svhn'.*allowed"):
        pixel_stats_for("svhn", "", 3)


def test_dataset_spec_checks_itself():
    good = DATASETS["cifar10"]
    fields = {f: getattr(good, f) for f in good.__dataclass_fields__}
    with pytest.raises(ValueError, match="pixel_stats describe 1 channels"):
        DatasetSpec(**(fields | {"pixel_stats": PixelStats((0.5,), (0.25,))}))
    with pytest.raises(ValueError, match="image_size"):
        DatasetSpec(**(fields | {"image_size": (32, 0)}))
    with pytest.raises(ValueError, match="num_classes"):
        DatasetSpec(**(fields | {"num_classes": 0}))


# A data set registered by the test alone: 3 classes of 3x2x2 images in one
# file per split, ``N`` then ``N`` labels then the pixels, one byte each.

TINY_HINT = "run write_tiny() to make it"


def write_tiny(folder: Path, split: str, n: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 3, 2, 2), dtype=np.uint8)
    labels = rng.integers(0, 3, size=n, dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.tiny").write_bytes(bytes([n]) + labels.tobytes() + images.tobytes())
    return images, labels


def _tiny_files(split: str, folder: Path) -> list[Path]:
    path = folder / f"{split}.tiny"
    if not path.is_file():
        raise SourceError(path, "file not found")
    return [path]


def _tiny_decode(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    raw = files[0].read_bytes()
    n = raw[0] if raw else 0
    if len(raw) != 1 + n + n * 12:
        raise SourceError(files[0], f"{len(raw)} bytes, expected {1 + n + n * 12}")
    labels = np.frombuffer(raw, np.uint8, count=n, offset=1).astype(np.int64)
    images = np.frombuffer(raw, np.uint8, offset=1 + n).reshape(n, 3, 2, 2).copy()
    return images, labels


TINY_STATS = PixelStats((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))


@pytest.fixture
def tiny(monkeypatch):
    """Register the tiny data set; return its spec and the list of decoded file lists."""
    decoded: list[list[Path]] = []

    def decode(files):
        decoded.append(list(files))
        return _tiny_decode(files)

    spec = DatasetSpec(
        name="tiny", num_classes=3, channels=3, image_size=(2, 2), pixel_stats=TINY_STATS,
        default_dir="/nonexistent/tiny", hint=TINY_HINT, files=_tiny_files, decode=decode,
    )
    monkeypatch.setitem(DATASETS, "tiny", spec)
    return spec, decoded


def test_registered_dataset_loads(tmp_path, tiny, monkeypatch):
    _, decoded = tiny
    images, labels = write_tiny(tmp_path, "train")
    ds = load_split("tiny", "train", tmp_path)
    assert ds.images.shape == (6, 3, 2, 2) and ds.num_classes == 3
    assert np.array_equal(ds.images.numpy(), images) and np.array_equal(ds.labels.numpy(), labels)
    assert decoded == [[tmp_path / "train.tiny"]]

    monkeypatch.delenv("NMOE_DATA_DIR", raising=False)
    assert resolve_data_dir("tiny") == Path("/nonexistent/tiny")
    assert pixel_stats_for("tiny", "", 3) == TINY_STATS
    with pytest.raises(ValueError, match="tiny.*3 channels"):
        pixel_stats_for("tiny", "", 1)
    with pytest.raises(ValueError, match="'tiny'"):
        dataset_spec("nope")


def test_registered_dataset_cached(tmp_path, tiny):
    _, decoded = tiny
    src, cache = tmp_path / "src", tmp_path / "cache"
    images, labels = write_tiny(src, "test", n=5)
    first = load_split_cached("tiny", "test", src, cache)
    second = load_split_cached("tiny", "test", src, cache)
    assert len(decoded) == 1  # the second call read the cache
    names = sorted(p.name for p in cache.iterdir())
    assert len(names) == 2 and all(n.startswith("tiny-test-") for n in names)
    for ds in (first, second):
        assert ds.num_classes == 3
        assert np.array_equal(ds.images.numpy(), images) and np.array_equal(ds.labels.numpy(), labels)


def test_registered_dataset_errors_carry_its_hint(tmp_path, tiny):
    with pytest.raises(DataError) as err:
        load_split("tiny", "train", tmp_path)
    assert str(err.value) == f"tiny: {tmp_path / 'train.tiny'}: file not found; {TINY_HINT}"
    assert isinstance(err.value.__cause__, SourceError)

    (tmp_path / "train.tiny").write_bytes(bytes([2, 0, 1]))
    with pytest.raises(DataError) as err:
        load_split_cached("tiny", "train", tmp_path, tmp_path / "cache")
    assert str(err.value) == f"tiny: {tmp_path / 'train.tiny'}: 3 bytes, expected 27; {TINY_HINT}"
    with pytest.raises(ValueError, match="'valid'"):
        load_split("tiny", "valid", tmp_path)


def test_registered_dataset_output_checked_against_spec(tmp_path, tiny, monkeypatch):
    spec, _ = tiny
    write_tiny(tmp_path, "train")
    # A decoder whose output contradicts the spec (here: 1 channel, not 3) is caught.
    grey = DatasetSpec(**({f: getattr(spec, f) for f in spec.__dataclass_fields__} | {
        "decode": lambda files: (_tiny_decode(files)[0][:, :1], _tiny_decode(files)[1]),
    }))
    monkeypatch.setitem(DATASETS, "tiny", grey)
    with pytest.raises(DataError, match=r"tiny: .*decoded images are uint8 \(6, 1, 2, 2\), expected uint8 \(N, 3, 2, 2\)"):
        load_split("tiny", "train", tmp_path)
    out_of_range = DatasetSpec(**({f: getattr(spec, f) for f in spec.__dataclass_fields__} | {
        "num_classes": 2,
    }))
    write_tiny(tmp_path, "test", n=30)  # 30 labels drawn from 0..2 include a 2
    monkeypatch.setitem(DATASETS, "tiny", out_of_range)
    with pytest.raises(DataError, match=r"labels out of range 0..1; run write_tiny"):
        load_split("tiny", "test", tmp_path)


def test_source_error_pickles():
    err = pickle.loads(pickle.dumps(SourceError(Path("/x/y"), "broken")))
    assert isinstance(err, DataError) and str(err) == "/x/y: broken"
    assert (err.path, err.problem) == (Path("/x/y"), "broken")


# --- package layout ----------------------------------------------------------

DATA_PKG = Path(data_pkg.__file__).parent
PUBLIC = [
    "PixelStats", "DatasetSpec", "DATASETS", "dataset_spec", "pixel_stats_for", "ImageSet",
    "DataError", "ClientSplits", "make_client_splits", "all_client_splits", "load_dataset",
    "subset", "partition_indices", "class_counts", "load_split", "load_split_cached",
    "load_hf_split", "resolve_data_dir",
]


def test_public_names():
    assert sorted(data_pkg.__all__) == sorted(PUBLIC)
    assert all(hasattr(data_pkg, name) for name in PUBLIC)
    from nmoe_flwr.data import federated, registry, sources

    assert data_pkg.ClientSplits is federated.ClientSplits
    assert data_pkg.DATASETS is registry.DATASETS
    assert sources.DATA_DIR_ENV == "NMOE_DATA_DIR"


def _imports(tree: ast.AST):
    """(top-level module name, at module level?) for every import in ``tree``."""
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], id(node) in top_level
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.split(".")[0], id(node) in top_level


def test_data_imports_only_numpy_torch_and_lazy_flwr_datasets():
    allowed = set(sys.stdlib_module_names) | {"__future__", "numpy", "torch"}
    for path in sorted(DATA_PKG.glob("*.py")):
        for module, at_top in _imports(ast.parse(path.read_text())):
            assert module not in ("flwr", "grpc"), f"{path.name} imports {module}"
            if module == "flwr_datasets":
                assert not at_top, f"{path.name} must import flwr_datasets lazily"
            else:
                assert module in allowed, f"{path.name} imports {module}"


def test_only_the_registry_names_data_sets():
    for path in sorted(DATA_PKG.glob("*.py")):
        if path.name == "registry.py":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef)
            and node.body and isinstance(node.body[0], ast.Expr)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                assert "fashion-mnist" not in node.value and "cifar10" not in node.value, (
                    f"{path.name} names a data set in code: {node.value!r}"
                )
