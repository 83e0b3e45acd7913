"""Stage 1 by FedSC: a client's self-supervised side of federated spectral
contrastive learning.

The model (extractor + projector), the spectral contrastive loss, the
feature-correlation matrix a client shares each round and one round of local
training against the other clients' matrices. The server's side is
:class:`nmoe_flwr.strategies.FedSC`; the privacy of the shared matrices is
:mod:`nmoe_flwr.algorithms.privacy`.

References: NMoE paper Eq. (3) and Sec. III-A; FedSC's public code
(ShusenJing/FedSC_ICML2024: norm clipping at ``sqrt(mu)``, alpha decayed
linearly from 1 to 0.2, SGD with momentum and gradient-norm clipping).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..config import RunConfig
from ..data.augment import ssl_view, two_views
from ..data.registry import PixelStats
from .models import ResNet20
from .seeding import derive_seed, generator, seeded
from .training import FitStats, Runtime, cosine, fit, make_optimizers


class SSLModel(nn.Module):
    """Extractor ``F`` plus a projector MLP (``extractor.*``, ``projector.*`` keys).

    Only the extractor is kept for the NMoE stages; the projector exists for
    the contrastive objective (as in SimCLR/FedSC).
    """

    def __init__(self, stats: PixelStats, proj_dim: int, hidden: int = 256, norm: str = "batch") -> None:
        super().__init__()
        self.extractor = ResNet20(stats, norm)
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


def new_ssl_model(stats: PixelStats, proj_dim: int, seed: int, norm: str = "batch") -> SSLModel:
    """A freshly initialised extractor + projector (seeded; ``norm`` of the ResNet20)."""
    with seeded(seed):
        return SSLModel(stats, proj_dim, norm=norm)


@torch.no_grad()
def fedsc_correlation(model: SSLModel, x: Tensor, cfg: RunConfig, runtime: Runtime, seed: int) -> Tensor:
    """A client's correlation matrix ``R_i`` under the current weights.

    ``(1 / (P n)) sum_{p, x} z z^T`` over ``P = fedsc-corr-passes`` augmented
    passes of its ``n`` samples, every ``z`` clipped to norm ``sqrt(mu)``
    (which bounds the sensitivity, :mod:`nmoe_flwr.algorithms.privacy`).

    Notes
    -----
    BatchNorm runs on its running statistics here (eval mode), while the
    local ``R`` inside :func:`spectral_loss` sees batch statistics (train
    mode), so the two differ (cosine 0.69 measured on the same views). The
    mismatch is kept on purpose: the DP bound ``sqrt(2) mu / n`` needs every
    ``z`` to depend on its own sample only. Under batch statistics one image
    moves every embedding of its batch (7x the bound in
    ``tests/test_fedsc.py``), so the released matrix would no longer be
    private at the stated epsilon. FedSC's public code has no such mismatch
    because its ResNet20 is BatchNorm-free (Fixup); ``extractor-norm =
    "none"`` is that extractor here, and removes the mismatch with the
    guarantee intact.
    """
    model.eval()
    g = generator(seed, runtime.device)
    d = cfg.fedsc_proj_dim
    acc = torch.zeros(d, d, device=runtime.device, dtype=torch.float64)
    for _ in range(cfg.fedsc_corr_passes):
        for start in range(0, x.shape[0], cfg.fedsc_batch_size * 2):
            view = ssl_view(x[start : start + cfg.fedsc_batch_size * 2], g, cfg.fedsc_gray_jitter)
            with runtime.autocast():
                z = model(runtime.inputs(view)).float()
            z = clip_norm(z, cfg.fedsc_mu).double()
            acc += z.T @ z
    return (acc / (cfg.fedsc_corr_passes * x.shape[0])).float()


def train_fedsc(
    model: SSLModel,
    x: Tensor,
    r_ext: Tensor | None,
    alpha: float,
    cfg: RunConfig,
    runtime: Runtime,
    *,
    lr: float,
    seed: int,
) -> FitStats:
    """One round of FedSC's local training: two augmented views per sample,
    spectral contrastive loss against ``R_ext`` (SGD momentum, weight decay,
    gradient-norm clip ``fedsc-grad-clip``, as in FedSC's public code)."""
    g = generator(derive_seed(seed, "views"), runtime.device)

    def loss_fn(m: nn.Module, batch: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        v0, v1 = two_views(batch[0], g, cfg.fedsc_gray_jitter)
        z0, z1 = m(runtime.inputs(v0)), m(runtime.inputs(v1))
        return spectral_loss(z0, z1, alpha, r_ext, cfg.fedsc_mu), torch.zeros((), device=v0.device)

    opts = make_optimizers(model, "sgd", lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return fit(
        model, loss_fn, (x,),
        epochs=cfg.fedsc_local_epochs, batch_size=cfg.fedsc_batch_size, optimizers=opts, runtime=runtime,
        generator=generator(seed, runtime.device), grad_clip=cfg.fedsc_grad_clip,
    )


def fedsc_round_lr(base_lr: float, server_round: int, num_rounds: int) -> float:
    """FedSC learning rate of a round: cosine decay over the rounds from ``base_lr``."""
    return base_lr * cosine((server_round - 1) / max(num_rounds, 1))
