"""FedSC's self-supervised pieces: the model, the spectral contrastive loss
and the feature-correlation matrices that clients share.

References: NMoE paper Eq. (3) and Sec. III-A; FedSC's public code (norm
clipping at ``sqrt(mu)``, alpha decayed linearly from 1 to 0.2).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .models import ResNet20


class SSLModel(nn.Module):
    """Extractor ``F`` plus a projector MLP (``extractor.*``, ``projector.*`` keys).

    Only the extractor is kept for the NMoE stages; the projector exists for
    the contrastive objective (as in SimCLR/FedSC).
    """

    def __init__(self, in_channels: int, proj_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.extractor = ResNet20(in_channels)
        self.projector = nn.Sequential(
            nn.Linear(ResNet20.out_dim, hidden), nn.ReLU(), nn.Linear(hidden, proj_dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.projector(self.extractor(x))


def clip_norm(z: Tensor, mu: float) -> Tensor:
    """Rescale rows whose norm exceeds ``sqrt(mu)`` to norm ``sqrt(mu)``.

    Bounds every sample's contribution ``z z^T`` to a correlation matrix by
    ``mu`` in Frobenius norm: the sensitivity the DP noise is scaled to.
    """
    norms = z.norm(dim=1, keepdim=True)
    return z * (math.sqrt(mu) / norms.clamp_min(1e-12)).clamp(max=1.0)


def correlation(z: Tensor) -> Tensor:
    """``R = Z^T Z / N`` for ``(N, d)`` embeddings."""
    return z.T @ z / z.shape[0]


def spectral_loss(z0: Tensor, z1: Tensor, alpha: float, r_ext: Tensor | None, mu: float) -> Tensor:
    """FedSC's local loss on two views' projected embeddings (DESIGN.md section 4).

    ``-2 mean_b <z1_b, z0_b> + alpha ||R||_F^2 + 2 (1 - alpha) tr(R R_ext)``
    with ``R = Z^T Z / (2B)`` over both (norm-clipped) views. ``alpha = 1``
    is the local spectral contrastive loss (HaoChen et al. 2021); smaller
    alpha contrasts this client's samples with the other clients' data
    through their correlation matrix ``R_ext``.
    """
    z0, z1 = clip_norm(z0.float(), mu), clip_norm(z1.float(), mu)
    positive = -2.0 * (z0 * z1).sum(dim=1).mean()
    r = correlation(torch.cat([z0, z1]))
    negative = alpha * (r * r).sum()
    if r_ext is not None and alpha < 1.0:
        negative = negative + 2.0 * (1.0 - alpha) * (r * r_ext).sum()  # tr(R R_ext), both symmetric
    return positive + negative


def alpha_at(server_round: int, num_rounds: int, start: float, end: float) -> float:
    """Linear alpha schedule: ``start`` in round 1 to ``end`` in the last round."""
    if num_rounds <= 1:
        return start
    return start + (end - start) * (server_round - 1) / (num_rounds - 1)
