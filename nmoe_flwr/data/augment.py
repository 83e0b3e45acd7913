"""Batched augmentations on uint8 image tensors, on the training device.

No per-sample Python loop and no PIL: a whole batch is cropped and flipped by
tensor indexing, which costs well under 1 % of a ResNet20 training step.
"""

from __future__ import annotations

import torch
from torch import Tensor


def random_crop_flip(x: Tensor, pad: int, generator: torch.Generator) -> Tensor:
    """Random ``pad``-pixel translation (zero padding) and horizontal flip.

    Parameters
    ----------
    x : Tensor
        ``(B, C, H, W)`` images, any dtype (uint8 stays uint8).
    pad : int
        Maximum shift in pixels; 0 disables cropping.
    generator : torch.Generator
        Seeded source of randomness on ``x.device``.

    Returns
    -------
    Tensor
        Augmented ``(B, C, H, W)`` batch; each sample gets its own shift and
        flip.
    """
    b, _, h, w = x.shape
    dev = x.device
    rows = torch.arange(h, device=dev).expand(b, h)
    cols = torch.arange(w, device=dev).expand(b, w)
    if pad > 0:
        x = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (b, 1), device=dev, generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (b, 1), device=dev, generator=generator)
        rows, cols = rows + dy, cols + dx
    flip = torch.rand(b, 1, device=dev, generator=generator) < 0.5
    cols = torch.where(flip, cols.flip(1), cols)
    batch = torch.arange(b, device=dev).view(b, 1, 1, 1)
    chan = torch.arange(x.shape[1], device=dev).view(1, -1, 1, 1)
    return x[batch, chan, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]
