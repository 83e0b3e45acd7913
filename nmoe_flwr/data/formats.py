"""Readers for the on-disk formats of the local data sets.

Two formats, no extra dependencies: IDX files (MNIST-style, plain or gzipped)
and the pickled batches of the official ``cifar-10-batches-py`` folder.  The
readers know nothing about data-set names or how to obtain the data: they
raise :class:`SourceError` naming the path and the problem, and the loaders in
:mod:`nmoe_flwr.data.sources` add the data set's name and hint from the
registry.
"""

from __future__ import annotations

import codecs
import gzip
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np

from .images import DataError


class SourceError(DataError):
    """A source file or folder is missing or malformed.

    ``str(err)`` is ``"<path>: <problem>"``; the loaders re-raise it as a
    :class:`DataError` that also names the data set and how to obtain it.
    Being a ``DataError`` itself, it is still caught as one when a reader or
    a registry entry is called directly.

    Parameters
    ----------
    path : Path
        The file or folder at fault.
    problem : str
        What is wrong with it, without the path.
    """

    def __init__(self, path: Path, problem: str) -> None:
        # Both go into ``args`` so the exception pickles and unpickles intact.
        super().__init__(Path(path), problem)
        self.path = Path(path)
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


def find_files(folder: Path, names: Sequence[str]) -> list[Path]:
    """Return ``folder / name`` for each of ``names``, in that order.

    Raises
    ------
    SourceError
        ``folder`` does not exist (``"folder not found"``), or the first
        missing file (``"file not found"``).
    """
    if not folder.is_dir():
        raise SourceError(folder, "folder not found")
    for name in names:
        if not (folder / name).is_file():
            raise SourceError(folder / name, "file not found")
    return [folder / name for name in names]


def find_idx(folder: Path, stem: str) -> Path:
    """Return the IDX file ``folder / stem``, plain or with a ``.gz`` suffix.

    The plain file wins when both exist.

    Raises
    ------
    SourceError
        ``folder`` does not exist, or neither variant of the file does.
    """
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    if not folder.is_dir():
        raise SourceError(folder, "folder not found")
    raise SourceError(folder / stem, "file not found (plain or .gz)")


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file of rank ``ndim``.

    Parameters
    ----------
    path : Path
        The file; gunzipped first when its suffix is ``.gz``.
    ndim : int
        Expected rank (3 for images, 1 for labels).

    Returns
    -------
    numpy.ndarray
        A writable ``uint8`` array with the file's dimensions.

    Raises
    ------
    SourceError
        Unreadable file, a header that is not ubyte of rank ``ndim``, or a
        payload whose size disagrees with the header.
    """
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise SourceError(path, f"cannot read ({exc})") from exc
    # Header: two zero bytes, dtype code (0x08 = ubyte), rank, then big-endian uint32 dims.
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != ndim:
        raise SourceError(
            path, f"bad IDX magic {raw[:4].hex() or '(empty)'}, expected 000008{ndim:02x}"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise SourceError(path, "truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise SourceError(
            path, f"IDX dims {dims} need {expected} data bytes, file has {len(raw) - header}"
        )
    # frombuffer views the immutable bytes; the copy makes the array writable.
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def read_idx_images(
    images_path: Path, labels_path: Path, image_size: tuple[int, int], num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Read a grey-scale image set stored as an IDX image file and an IDX label file.

    Parameters
    ----------
    images_path, labels_path : Path
        Rank-3 ``(N, H, W)`` and rank-1 ``(N,)`` IDX files.
    image_size : tuple of int
        Expected ``(H, W)``.
    num_classes : int
        Labels must lie in ``[0, num_classes)``.

    Returns
    -------
    images : numpy.ndarray
        ``uint8`` array of shape ``(N, 1, H, W)``.
    labels : numpy.ndarray
        ``int64`` array of shape ``(N,)``.

    Raises
    ------
    SourceError
        Any error of :func:`read_idx`, images of another size, a label count
        that differs from the image count, or a label out of range.
    """
    images = read_idx(images_path, 3)
    labels = read_idx(labels_path, 1)
    image_size = tuple(image_size)
    if images.shape[1:] != image_size:
        raise SourceError(images_path, f"images are {images.shape[1:]}, expected {image_size}")
    if len(images) != len(labels):
        raise SourceError(labels_path, f"{len(labels)} labels for {len(images)} images in {images_path}")
    if labels.size and labels.max() >= num_classes:
        raise SourceError(labels_path, f"label {int(labels.max())} out of range 0..{num_classes - 1}")
    return images[:, None, :, :], labels.astype(np.int64)


def _np_reconstruct():
    core = getattr(np, "_core", None) or np.core  # numpy >= 2 renamed core -> _core
    return core.multiarray._reconstruct


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else.

    The CIFAR-10 batches are pickles; refusing every other global means a
    tampered file cannot run code while being loaded.
    """

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset({
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # Python 3's pickle protocol <= 2 writes bytes as _codecs.encode(str, "latin1"):
        # a pure text-to-bytes transform, so batches re-saved by Python 3 load too.
        ("_codecs", "encode"),
    })

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}")
        if name == "_reconstruct":
            return _np_reconstruct()
        if module == "_codecs":
            return codecs.encode
        return getattr(np, name)


def read_cifar_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one pickled batch of the official CIFAR-10 python release.

    The batch is unpickled with an unpickler that only rebuilds numpy arrays,
    so a tampered file cannot run code.

    Parameters
    ----------
    path : Path
        A ``data_batch_<i>`` or ``test_batch`` file.
    num_classes : int
        Labels must lie in ``[0, num_classes)``.

    Returns
    -------
    images : numpy.ndarray
        ``uint8`` array of shape ``(N, 3, 32, 32)`` (a view of the batch).
    labels : numpy.ndarray
        ``int64`` array of shape ``(N,)``.

    Raises
    ------
    SourceError
        The file cannot be unpickled (including forbidden globals), lacks the
        keys ``b'data'``/``b'labels'``, has data that is not ``uint8 (N,
        3072)``, a label count other than ``N``, or a label out of range.
    """
    try:
        with path.open("rb") as fh:
            batch = _ArrayUnpickler(fh, encoding="bytes").load()
    except Exception as exc:  # any unpickling failure means a corrupt or hostile file
        raise SourceError(path, f"cannot unpickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise SourceError(path, "not a CIFAR-10 batch (need keys b'data' and b'labels')")
    data, labels = batch[b"data"], np.asarray(batch[b"labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise SourceError(path, f"b'data' must be uint8 (N, 3072), got {shape}")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise SourceError(path, f"{labels.shape} labels for {len(data)} images")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise SourceError(path, f"labels out of range 0..{num_classes - 1}")
    # Rows are 1024 red, 1024 green, 1024 blue values, each row-major 32x32.
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def read_cifar_batches(paths: Sequence[Path], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read and concatenate CIFAR-10 batches, in the order of ``paths``.

    Returns
    -------
    images : numpy.ndarray
        C-contiguous ``uint8`` array of shape ``(N, 3, 32, 32)``.
    labels : numpy.ndarray
        ``int64`` array of shape ``(N,)``.

    Raises
    ------
    SourceError
        Any error of :func:`read_cifar_batch`, for the first bad batch.
    """
    parts = [read_cifar_batch(p, num_classes) for p in paths]
    return (
        np.ascontiguousarray(np.concatenate([p[0] for p in parts])),
        np.concatenate([p[1] for p in parts]),
    )
