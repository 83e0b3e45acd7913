"""The data sets nmoe-flwr knows: one entry per data set, one place to add one.

A local data set is a :class:`DatasetSpec` in :data:`DATASETS`: its size,
pixel statistics, default folder, how to obtain it, and two functions that
find and decode its files (usually thin wrappers around the readers in
:mod:`nmoe_flwr.data.formats`).  The loaders in :mod:`nmoe_flwr.data.sources`
and :func:`pixel_stats_for` read nothing else, so adding an entry here is the
whole change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .formats import find_files, find_idx, read_cifar_batches, read_idx_images


@dataclass(frozen=True)
class PixelStats:
    """Per-channel mean and standard deviation of a data set's pixels, in [0, 1] units.

    The extractor normalises ``uint8`` input with these itself, so images stay
    ``uint8`` (4x smaller) from disk to the training device. The number of
    channels is ``len(mean)``.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"pixel mean {self.mean} and std {self.std} must have one entry per channel")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"pixel std must be positive, got {self.std}")

    @property
    def channels(self) -> int:
        """Number of image channels these statistics describe."""
        return len(self.mean)

    @classmethod
    def neutral(cls, channels: int) -> PixelStats:
        """Mean 0.5, std 0.25 per channel: for data sets without known statistics."""
        return cls((0.5,) * channels, (0.25,) * channels)


# Splits every registered data set provides; the loaders reject any other.
SPLITS = ("train", "test")

DATA_DIR_ENV = "NMOE_DATA_DIR"

FilesFn = Callable[[str, Path], list[Path]]
DecodeFn = Callable[[list[Path]], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the loaders need to know about one local data set.

    Registering a ``DatasetSpec`` in :data:`DATASETS` is all it takes for
    :func:`~nmoe_flwr.data.sources.resolve_data_dir`,
    :func:`~nmoe_flwr.data.sources.load_split`,
    :func:`~nmoe_flwr.data.sources.load_split_cached` and
    :func:`pixel_stats_for` to handle it.

    Attributes
    ----------
    name : str
        The run-config value of ``dataset``; also the prefix of cache files
        and of error messages.
    num_classes : int
        Number of classes; labels lie in ``[0, num_classes)``.
    channels : int
        Image channels ``C``.
    image_size : tuple of int
        Image ``(H, W)``.
    pixel_stats : PixelStats
        Per-channel pixel mean and std the extractor normalises with; must
        have ``channels`` entries.
    default_dir : str
        Folder read when neither the run config nor ``NMOE_DATA_DIR`` names one.
    hint : str
        How to obtain the data; appended to every error about missing or
        corrupt files.
    per_class : mapping of str to int, optional
        Images of each class in each split (``{"train": ..., "test": ...}``),
        for balanced data sets; the run config checks partitions against it
        before anything starts. ``None``: not known (checked when loading).
    files : callable
        ``files(split, folder) -> list[Path]``: the source files of ``split``
        (one of :data:`SPLITS`) in ``folder``, in a fixed order.  Raises
        :class:`~nmoe_flwr.data.formats.SourceError` for a missing folder or
        file.  The list also keys the decode cache (each file's path, size
        and mtime), so it must name every file ``decode`` reads.
    decode : callable
        ``decode(files) -> (images, labels)``: ``uint8`` images of shape
        ``(N, channels, *image_size)`` and ``int64`` labels of shape
        ``(N,)``.  Raises :class:`~nmoe_flwr.data.formats.SourceError` for
        unreadable or malformed content; the loaders check the returned
        arrays against this spec as well.

    Raises
    ------
    ValueError
        On construction, if the sizes are not positive or ``pixel_stats``
        describes another number of channels.
    """

    name: str
    num_classes: int
    channels: int
    image_size: tuple[int, int]
    pixel_stats: PixelStats
    default_dir: str
    hint: str
    files: FilesFn
    decode: DecodeFn
    per_class: Mapping[str, int] | None = None

    def __post_init__(self) -> None:
        if self.num_classes < 1 or self.channels < 1:
            raise ValueError(
                f"{self.name}: num_classes and channels must be >= 1, "
                f"got {self.num_classes} and {self.channels}"
            )
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"{self.name}: image_size must be a positive (H, W), got {self.image_size}")
        if self.pixel_stats.channels != self.channels:
            raise ValueError(
                f"{self.name}: pixel_stats describe {self.pixel_stats.channels} channels, "
                f"the images have {self.channels}"
            )


# --- Fashion-MNIST: IDX files as installed by Debian's dataset-fashion-mnist ---

_FASHION_MNIST_PREFIX = {"train": "train", "test": "t10k"}


def _fashion_mnist_files(split: str, folder: Path) -> list[Path]:
    prefix = _FASHION_MNIST_PREFIX[split]
    return [
        find_idx(folder, f"{prefix}-images-idx3-ubyte"),
        find_idx(folder, f"{prefix}-labels-idx1-ubyte"),
    ]


def _fashion_mnist_decode(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    images_path, labels_path = files
    # Sizes come from the spec (looked up at call time) so they are stated once.
    spec = FASHION_MNIST
    return read_idx_images(images_path, labels_path, spec.image_size, spec.num_classes)


FASHION_MNIST = DatasetSpec(
    name="fashion-mnist",
    num_classes=10,
    channels=1,
    image_size=(28, 28),
    pixel_stats=PixelStats(mean=(0.2860,), std=(0.3530,)),
    default_dir="/usr/share/datasets/fashion-mnist",
    hint=(
        "install it with `apt-get install dataset-fashion-mnist` or set "
        f"{DATA_DIR_ENV} / the run-config key data-dir to a folder with the IDX files"
    ),
    files=_fashion_mnist_files,
    decode=_fashion_mnist_decode,
    per_class={"train": 6000, "test": 1000},
)


# --- CIFAR-10: the official cifar-10-batches-py pickle folder -----------------


def _cifar10_files(split: str, folder: Path) -> list[Path]:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    return find_files(folder, names)


def _cifar10_decode(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    return read_cifar_batches(files, CIFAR10.num_classes)


CIFAR10 = DatasetSpec(
    name="cifar10",
    num_classes=10,
    channels=3,
    image_size=(32, 32),
    pixel_stats=PixelStats(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    default_dir="data/cifar-10-batches-py",
    hint=(
        "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, extract it "
        f"and point data-dir / {DATA_DIR_ENV} at the cifar-10-batches-py folder"
    ),
    files=_cifar10_files,
    decode=_cifar10_decode,
    per_class={"train": 5000, "test": 1000},
)


DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (FASHION_MNIST, CIFAR10)}
"""The local data sets by name; add a :class:`DatasetSpec` here to add one."""


def dataset_spec(name: str) -> DatasetSpec:
    """Return the registered spec of data set ``name``.

    Raises
    ------
    ValueError
        If ``name`` is not in :data:`DATASETS`; the message lists the
        allowed names.
    """
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; allowed: {sorted(DATASETS)}") from None


def pixel_stats_for(dataset: str, hf_dataset: str, channels: int) -> PixelStats:
    """Pixel statistics to normalise the run's images with.

    Parameters
    ----------
    dataset : str
        The run config's local data set; ignored when ``hf_dataset`` is set,
        as the loaders ignore it then.
    hf_dataset : str
        The run config's Hugging Face id, ``""`` for none.
    channels : int
        Channels of the images actually loaded.

    Returns
    -------
    PixelStats
        For a local data set, the registry's statistics.  For a Hugging Face
        data set, ``PixelStats.neutral(channels)`` (mean 0.5, std 0.25): its
        statistics are not known in advance, and borrowing those of a local
        data set with the same channel count would be silently wrong.

    Raises
    ------
    ValueError
        Unknown ``dataset``, or ``channels`` differs from the registered
        data set's channel count.
    """
    if hf_dataset:
        return PixelStats.neutral(channels)
    spec = dataset_spec(dataset)
    if channels != spec.channels:
        raise ValueError(f"{dataset} images have {spec.channels} channels, got {channels}")
    return spec.pixel_stats
