"""Data sets and federated client splits for nmoe_flwr.

What lives here
---------------
``registry``
    :class:`DatasetSpec` and :data:`DATASETS`, the one place that describes
    each local data set (sizes, pixel statistics, folder, hint, file layout);
    :func:`pixel_stats_for`.
``formats``
    Readers of the on-disk formats (IDX, CIFAR-10 pickle batches), which
    know no data-set names.
``images``
    :class:`ImageSet` (uint8 images and int64 labels in memory),
    :class:`DataError`, :func:`subset`.
``sources``
    Loading one split: :func:`resolve_data_dir`, :func:`load_split`,
    :func:`load_split_cached`, :func:`load_hf_split`, driven by the registry.
``partition``
    The non-IID(tau) client partitions: :func:`class_counts`,
    :func:`partition_indices`.
``federated``
    From the run config to every client's data: :class:`ClientSplits`,
    :func:`make_client_splits`, :func:`load_dataset`,
    :func:`all_client_splits` (a client keeps its own part on its disk:
    :class:`nmoe_flwr.client_state.ClientStore`).
``augment``
    Batched augmentations on the training device (import
    ``nmoe_flwr.data.augment`` directly).

Dependencies
------------
Any module of nmoe_flwr may import this package.  This package imports only
the standard library, numpy and torch, plus the optional ``flwr_datasets``
lazily inside :func:`load_hf_split`; never flwr or grpc, so loading data needs
no Flower runtime.
"""

from .federated import ClientSplits, all_client_splits, load_dataset, make_client_splits
from .images import DataError, ImageSet, subset
from .partition import class_counts, partition_indices
from .registry import DATASETS, DatasetSpec, PixelStats, dataset_spec, pixel_stats_for
from .sources import load_hf_split, load_split, load_split_cached, resolve_data_dir

__all__ = [
    "DATASETS",
    "ClientSplits",
    "DataError",
    "DatasetSpec",
    "ImageSet",
    "PixelStats",
    "all_client_splits",
    "class_counts",
    "dataset_spec",
    "load_dataset",
    "load_hf_split",
    "load_split",
    "load_split_cached",
    "make_client_splits",
    "partition_indices",
    "pixel_stats_for",
    "resolve_data_dir",
    "subset",
]
