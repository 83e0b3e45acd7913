"""The in-memory image set every loader returns, and the loaders' error type."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


class DataError(Exception):
    """A data set is missing or unreadable; the message names the path and the fix.

    Raised by the loaders in :mod:`nmoe_flwr.data.sources` as
    ``"<data set>: <path>: <problem>; <how to get the data>"`` for local data
    sets, and for a missing optional extra or unusable columns of a Hugging
    Face data set.
    """


@dataclass(frozen=True)
class ImageSet:
    """A labelled image set held in memory.

    Construction checks dtypes, ranks and lengths, so every ``ImageSet`` in
    the package satisfies the invariants below.

    Attributes
    ----------
    images : torch.Tensor
        ``uint8`` tensor of shape ``(N, C, H, W)``.
    labels : torch.Tensor
        ``int64`` tensor of shape ``(N,)`` with values in ``[0, num_classes)``.
    num_classes : int
        Number of classes of the data set (not only those present).

    Raises
    ------
    ValueError
        On construction, if ``images`` is not ``uint8`` of rank 4, ``labels``
        is not ``int64`` of rank 1, or their lengths differ.
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


def subset(data: ImageSet, idx: np.ndarray) -> ImageSet:
    """Return the samples of ``data`` at positions ``idx``, in that order.

    Parameters
    ----------
    data : ImageSet
        The set to select from.
    idx : numpy.ndarray
        Integer positions into ``data``; repeats are allowed.

    Returns
    -------
    ImageSet
        A copy (advanced indexing), so changing it leaves ``data`` intact;
        ``num_classes`` is that of ``data``.
    """
    index = torch.as_tensor(np.asarray(idx, dtype=np.int64))
    return ImageSet(data.images[index], data.labels[index], data.num_classes)
