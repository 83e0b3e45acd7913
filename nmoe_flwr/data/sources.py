"""Loading one split of a data set, from local files or from Hugging Face.

The local data sets are exactly those in
:data:`~nmoe_flwr.data.registry.DATASETS`; everything specific to one of them
(folders, file layout, decoding, hints) comes from its registry entry, so this
module has no per-data-set code.  Hugging Face data sets are an optional extra
(:func:`load_hf_split`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from .formats import SourceError
from .images import DataError, ImageSet
from .registry import DATA_DIR_ENV, SPLITS, DatasetSpec, dataset_spec

__all__ = [
    "DATA_DIR_ENV",
    "SPLITS",
    "load_hf_split",
    "load_split",
    "load_split_cached",
    "resolve_data_dir",
]

# Bump when the cached array layout changes so stale caches are ignored.
_CACHE_VERSION = 1


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {list(SPLITS)}")


def resolve_data_dir(dataset: str, configured: str = "") -> Path:
    """Return the folder to read ``dataset`` from.

    Precedence: ``configured`` (the run-config key ``data-dir``) when non-empty,
    then the environment variable ``NMOE_DATA_DIR``, then the data set's
    registered ``default_dir``.  The folder is not checked for existence here;
    ``load_split`` does that.

    Raises
    ------
    ValueError
        If ``dataset`` is not registered in ``DATASETS``.
    """
    spec = dataset_spec(dataset)
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get(DATA_DIR_ENV, "")
    if env:
        return Path(env).expanduser()
    return Path(spec.default_dir)


def _fail(spec: DatasetSpec, path: Path, problem: str) -> DataError:
    return DataError(f"{spec.name}: {path}: {problem}; {spec.hint}")


def _sources(spec: DatasetSpec, split: str, data_dir: Path) -> list[Path]:
    _check_split(split)
    try:
        return spec.files(split, Path(data_dir))
    except SourceError as exc:
        raise _fail(spec, exc.path, exc.problem) from exc


def _mismatch(spec: DatasetSpec, images: np.ndarray, labels: np.ndarray) -> str | None:
    """What about decoded (or cached) arrays contradicts ``spec``, if anything.

    Pixel statistics, the model's input layer and the partitioner all trust
    the registry's sizes, so arrays that disagree must not get past the loader.
    """
    expected = (spec.channels, *spec.image_size)
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.shape[1:] != expected:
        return (
            f"decoded images are {getattr(images, 'dtype', type(images).__name__)} "
            f"{getattr(images, 'shape', None)}, expected uint8 (N, {', '.join(map(str, expected))})"
        )
    if not isinstance(labels, np.ndarray) or labels.dtype != np.int64 or labels.shape != (len(images),):
        return (
            f"decoded labels are {getattr(labels, 'dtype', type(labels).__name__)} "
            f"{getattr(labels, 'shape', None)}, expected int64 ({len(images)},)"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        return f"decoded labels out of range 0..{spec.num_classes - 1}"
    return None


def _decode(spec: DatasetSpec, files: list[Path], data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        images, labels = spec.decode(files)
    except SourceError as exc:
        raise _fail(spec, exc.path, exc.problem) from exc
    problem = _mismatch(spec, images, labels)
    if problem is not None:
        raise _fail(spec, Path(data_dir), problem)
    return images, labels


def _to_imageset(spec: DatasetSpec, images: np.ndarray, labels: np.ndarray) -> ImageSet:
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels), spec.num_classes)


def load_split(dataset: str, split: str, data_dir: Path) -> ImageSet:
    """Decode one split of a local data set.

    Parameters
    ----------
    dataset : str
        A name in ``DATASETS`` (``"fashion-mnist"``, ``"cifar10"``, ...).
    split : {"train", "test"}
    data_dir : Path
        The folder with the data set's files, e.g. the IDX files
        (Fashion-MNIST, plain or gzipped) or the ``cifar-10-batches-py``
        folder (CIFAR-10).

    Returns
    -------
    ImageSet
        ``(N, channels, H, W)`` uint8 images and int64 labels in
        ``[0, num_classes)``, with the sizes of the data set's registry entry
        (``(N, 1, 28, 28)`` for Fashion-MNIST, ``(N, 3, 32, 32)`` for CIFAR-10).

    Raises
    ------
    ValueError
        Unknown ``dataset`` or ``split``.
    DataError
        Missing folder/file or corrupt content, as
        ``"<dataset>: <path>: <problem>; <how to obtain the data>"``.
    """
    spec = dataset_spec(dataset)
    files = _sources(spec, split, data_dir)
    return _to_imageset(spec, *_decode(spec, files, data_dir))


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

    Raises
    ------
    ValueError
        Unknown ``dataset`` or ``split``.
    DataError
        As ``load_split``, when the sources must be decoded.
    """
    if cache_dir is None:
        return load_split(dataset, split, data_dir)
    spec = dataset_spec(dataset)
    files = _sources(spec, split, data_dir)
    cache_dir = Path(cache_dir)
    stem = f"{dataset}-{split}-{_cache_key(dataset, split, files)}"
    img_path, lbl_path = cache_dir / f"{stem}-images.npy", cache_dir / f"{stem}-labels.npy"
    if img_path.is_file() and lbl_path.is_file():
        try:
            images, labels = np.load(img_path), np.load(lbl_path)
            problem = _mismatch(spec, images, labels)
        except (OSError, ValueError) as exc:
            problem = str(exc)
        if problem is None:
            return _to_imageset(spec, images, labels)
        # A damaged or stale-layout entry is not fatal: decode again and overwrite it.
        warnings.warn(f"ignoring unreadable cache {img_path}: {problem}", stacklevel=2)
    images, labels = _decode(spec, files, data_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _save_atomic(img_path, images)
        _save_atomic(lbl_path, labels)
    except OSError as exc:
        warnings.warn(f"cannot write data cache in {cache_dir}: {exc}", stacklevel=2)
    return _to_imageset(spec, images, labels)


def load_hf_split(name: str, split: str) -> ImageSet:
    """Load a Hugging Face image-classification split as an ``ImageSet``.

    Goes through ``flwr_datasets.FederatedDataset`` (the ``[hf]`` extra), which
    downloads and caches the data set: machines with internet only. The
    federated split itself is still made by :func:`partition_indices`, so a
    Hugging Face data set is partitioned exactly like the local ones. The
    image column is the first column holding PIL images or arrays; the
    label column is ``"label"`` or ``"labels"``.  Grey images become
    ``(N, 1, H, W)``, colour images ``(N, 3, H, W)``; all images must share a size.

    Parameters
    ----------
    name : str
        Hugging Face data set id, e.g. ``"uoft-cs/cifar10"``.
    split : str
        A split of that data set, e.g. ``"train"`` or ``"test"``.

    Returns
    -------
    ImageSet
        Every sample of the split, in the data set's order; ``num_classes``
        from the label feature, else ``max(label) + 1``.  No pixel statistics
        are known for it (see :func:`~nmoe_flwr.data.registry.pixel_stats_for`).

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
