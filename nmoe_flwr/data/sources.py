"""Loading the image data sets the NMoE experiments run on.

Two local formats are supported without extra dependencies: Fashion-MNIST as
IDX files (as installed by the Debian package ``dataset-fashion-mnist``) and
CIFAR-10 as the official ``cifar-10-batches-py`` pickle folder.  Hugging Face
data sets are an optional extra (``load_hf_split``).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATA_DIR_ENV = "NMOE_DATA_DIR"
DEFAULT_DIRS = {
    "fashion-mnist": "/usr/share/datasets/fashion-mnist",
    "cifar10": "data/cifar-10-batches-py",
}
SPLITS = ("train", "test")

_HINTS = {
    "fashion-mnist": (
        "install it with `apt-get install dataset-fashion-mnist` or set "
        f"{DATA_DIR_ENV} / the run-config key data-dir to a folder with the IDX files"
    ),
    "cifar10": (
        "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, extract it "
        f"and point data-dir / {DATA_DIR_ENV} at the cifar-10-batches-py folder"
    ),
}
_NUM_CLASSES = {"fashion-mnist": 10, "cifar10": 10}
# Bump when the cached array layout changes so stale caches are ignored.
_CACHE_VERSION = 1


class DataError(Exception):
    """A data set is missing or unreadable; the message names the path and the fix."""


@dataclass(frozen=True)
class ImageSet:
    """A labelled image set held in memory.

    Attributes
    ----------
    images : torch.Tensor
        ``uint8`` tensor of shape ``(N, C, H, W)``.
    labels : torch.Tensor
        ``int64`` tensor of shape ``(N,)`` with values in ``[0, num_classes)``.
    num_classes : int
        Number of classes of the data set (not only those present).
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.ndim != 1:
            raise ValueError(
                f"labels must be int64 (N,), got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)


def _check_dataset(dataset: str) -> None:
    if dataset not in DEFAULT_DIRS:
        raise ValueError(f"unknown dataset {dataset!r}; allowed: {sorted(DEFAULT_DIRS)}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {list(SPLITS)}")


def resolve_data_dir(dataset: str, configured: str = "") -> Path:
    """Return the folder to read ``dataset`` from.

    Precedence: ``configured`` (the run-config key ``data-dir``) when non-empty,
    then the environment variable ``NMOE_DATA_DIR``, then ``DEFAULT_DIRS[dataset]``.
    The folder is not checked for existence here; ``load_split`` does that.

    Raises
    ------
    ValueError
        If ``dataset`` is not one of ``DEFAULT_DIRS``.
    """
    _check_dataset(dataset)
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get(DATA_DIR_ENV, "")
    if env:
        return Path(env).expanduser()
    return Path(DEFAULT_DIRS[dataset])


def _fail(dataset: str, path: Path, problem: str) -> DataError:
    return DataError(f"{dataset}: {path}: {problem}; {_HINTS[dataset]}")


# --- Fashion-MNIST (IDX) -----------------------------------------------------

_IDX_PREFIX = {"train": "train", "test": "t10k"}


def _find_idx(data_dir: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (data_dir / name).is_file():
            return data_dir / name
    if not data_dir.is_dir():
        raise _fail("fashion-mnist", data_dir, "folder not found")
    raise _fail("fashion-mnist", data_dir / stem, "file not found (plain or .gz)")


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file of the expected rank."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise _fail("fashion-mnist", path, f"cannot read ({exc})") from exc
    # Header: two zero bytes, dtype code (0x08 = ubyte), rank, then big-endian uint32 dims.
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != ndim:
        raise _fail(
            "fashion-mnist", path,
            f"bad IDX magic {raw[:4].hex() or '(empty)'}, expected 000008{ndim:02x}",
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise _fail("fashion-mnist", path, "truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise _fail(
            "fashion-mnist", path,
            f"IDX dims {dims} need {expected} data bytes, file has {len(raw) - header}",
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _fashion_files(split: str, data_dir: Path) -> list[Path]:
    p = _IDX_PREFIX[split]
    return [_find_idx(data_dir, f"{p}-images-idx3-ubyte"), _find_idx(data_dir, f"{p}-labels-idx1-ubyte")]


def _decode_fashion(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    img_path, lbl_path = files
    images = _read_idx(img_path, 3)
    labels = _read_idx(lbl_path, 1)
    if images.shape[1:] != (28, 28):
        raise _fail("fashion-mnist", img_path, f"images are {images.shape[1:]}, expected (28, 28)")
    if len(images) != len(labels):
        raise _fail(
            "fashion-mnist", lbl_path, f"{len(labels)} labels for {len(images)} images in {img_path}"
        )
    if labels.size and labels.max() >= _NUM_CLASSES["fashion-mnist"]:
        raise _fail("fashion-mnist", lbl_path, f"label {int(labels.max())} out of range 0..9")
    return images[:, None, :, :], labels.astype(np.int64)


# --- CIFAR-10 (python pickle batches) ----------------------------------------


def _np_reconstruct():
    core = getattr(np, "_core", None) or np.core  # numpy >= 2 renamed core -> _core
    return core.multiarray._reconstruct


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else.

    The CIFAR-10 batches are pickles; refusing every other global means a
    tampered file cannot run code while being loaded.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}")
        if name == "_reconstruct":
            return _np_reconstruct()
        return getattr(np, name)


def _cifar_files(split: str, data_dir: Path) -> list[Path]:
    if not data_dir.is_dir():
        raise _fail("cifar10", data_dir, "folder not found")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    for name in names:
        if not (data_dir / name).is_file():
            raise _fail("cifar10", data_dir / name, "file not found")
    return [data_dir / n for n in names]


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as fh:
            batch = _ArrayUnpickler(fh, encoding="bytes").load()
    except Exception as exc:  # any unpickling failure means a corrupt or hostile file
        raise _fail("cifar10", path, f"cannot unpickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise _fail("cifar10", path, "not a CIFAR-10 batch (need keys b'data' and b'labels')")
    data, labels = batch[b"data"], np.asarray(batch[b"labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise _fail("cifar10", path, f"b'data' must be uint8 (N, 3072), got {shape}")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise _fail("cifar10", path, f"{labels.shape} labels for {len(data)} images")
    if labels.size and (labels.min() < 0 or labels.max() >= _NUM_CLASSES["cifar10"]):
        raise _fail("cifar10", path, "labels out of range 0..9")
    # Rows are 1024 red, 1024 green, 1024 blue values, each row-major 32x32.
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _decode_cifar(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    parts = [_read_cifar_batch(p) for p in files]
    return (
        np.ascontiguousarray(np.concatenate([p[0] for p in parts])),
        np.concatenate([p[1] for p in parts]),
    )


# --- public loaders ----------------------------------------------------------


def _sources(dataset: str, split: str, data_dir: Path) -> list[Path]:
    _check_dataset(dataset)
    _check_split(split)
    data_dir = Path(data_dir)
    return _fashion_files(split, data_dir) if dataset == "fashion-mnist" else _cifar_files(split, data_dir)


def _decode(dataset: str, files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    return _decode_fashion(files) if dataset == "fashion-mnist" else _decode_cifar(files)


def _to_imageset(dataset: str, images: np.ndarray, labels: np.ndarray) -> ImageSet:
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels), _NUM_CLASSES[dataset])


def load_split(dataset: str, split: str, data_dir: Path) -> ImageSet:
    """Decode one split of a local data set.

    Parameters
    ----------
    dataset : {"fashion-mnist", "cifar10"}
    split : {"train", "test"}
    data_dir : Path
        Folder with the IDX files (Fashion-MNIST, plain or gzipped) or the
        ``cifar-10-batches-py`` folder (CIFAR-10).

    Returns
    -------
    ImageSet
        ``(N, 1, 28, 28)`` or ``(N, 3, 32, 32)`` uint8 images with int64 labels.

    Raises
    ------
    ValueError
        Unknown ``dataset`` or ``split``.
    DataError
        Missing folder/file or corrupt content; the message names the path and
        how to obtain the data.
    """
    files = _sources(dataset, split, data_dir)
    return _to_imageset(dataset, *_decode(dataset, files))


def _cache_key(dataset: str, split: str, files: list[Path]) -> str:
    h = hashlib.sha256(f"v{_CACHE_VERSION}|{dataset}|{split}".encode())
    for f in files:
        st = f.stat()
        h.update(f"|{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _save_atomic(path: Path, array: np.ndarray) -> None:
    # Several client processes may fill the cache at once: each writes its own
    # temp file and renames it into place, so readers never see a partial file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_split_cached(
    dataset: str, split: str, data_dir: Path, cache_dir: Path | None
) -> ImageSet:
    """Like ``load_split``, but reuse decoded arrays stored under ``cache_dir``.

    The cache file names carry a key derived from each source file's resolved
    path, size and ``mtime_ns``, so replacing the data invalidates the cache.
    Cache files are written atomically; an unreadable cache entry is decoded
    again and rewritten, and a cache folder that cannot be written only emits a
    warning.  With ``cache_dir=None`` this is exactly ``load_split``.
    """
    if cache_dir is None:
        return load_split(dataset, split, data_dir)
    files = _sources(dataset, split, data_dir)
    cache_dir = Path(cache_dir)
    stem = f"{dataset}-{split}-{_cache_key(dataset, split, files)}"
    img_path, lbl_path = cache_dir / f"{stem}-images.npy", cache_dir / f"{stem}-labels.npy"
    if img_path.is_file() and lbl_path.is_file():
        try:
            return _to_imageset(dataset, np.load(img_path), np.load(lbl_path))
        except (OSError, ValueError) as exc:
            warnings.warn(f"ignoring unreadable cache {img_path}: {exc}", stacklevel=2)
    images, labels = _decode(dataset, files)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _save_atomic(img_path, images)
        _save_atomic(lbl_path, labels)
    except OSError as exc:
        warnings.warn(f"cannot write data cache in {cache_dir}: {exc}", stacklevel=2)
    return _to_imageset(dataset, images, labels)


def load_hf_split(name: str, split: str) -> ImageSet:
    """Load a Hugging Face image-classification split as an ``ImageSet``.

    Goes through ``flwr_datasets.FederatedDataset`` (the ``[hf]`` extra), which
    downloads and caches the data set: machines with internet only. The
    federated split itself is still made by :func:`partition_indices`, so a
    Hugging Face data set is partitioned exactly like the local ones. The
    image column is the first column holding PIL images or arrays; the
    label column is ``"label"`` or ``"labels"``.  Grey images become
    ``(N, 1, H, W)``, colour images ``(N, 3, H, W)``; all images must share a size.

    Raises
    ------
    DataError
        If ``flwr-datasets`` is not installed, or no image/label column is found.
    """
    try:
        from flwr_datasets import FederatedDataset  # optional extra, imported lazily
        from flwr_datasets.partitioner import IidPartitioner
    except ImportError as exc:
        raise DataError(
            f'Hugging Face data set {name!r} needs the optional extra: pip install "nmoe-flwr[hf]"'
        ) from exc
    # One partition = the whole split; nmoe_flwr partitions it afterwards.
    fds = FederatedDataset(dataset=name, partitioners={split: IidPartitioner(num_partitions=1)})
    ds = fds.load_split(split)
    label_col = next((c for c in ("label", "labels") if c in ds.column_names), None)
    first = ds[0] if len(ds) else {}
    img_col = next(
        (c for c in ds.column_names
         if c != label_col and (hasattr(first.get(c), "convert") or isinstance(first.get(c), np.ndarray))),
        None,
    )
    if label_col is None or img_col is None:
        raise DataError(f"{name} [{split}]: no image/label columns in {ds.column_names}")

    def to_array(img) -> np.ndarray:
        if hasattr(img, "convert") and img.mode not in ("L", "RGB"):
            img = img.convert("RGB")
        return np.asarray(img, dtype=np.uint8)

    images = np.stack([to_array(im) for im in ds[img_col]])
    images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    labels = np.asarray(ds[label_col], dtype=np.int64)
    feature = ds.features[label_col]
    num_classes = getattr(feature, "num_classes", None) or int(labels.max()) + 1
    return ImageSet(
        torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels), int(num_classes)
    )
