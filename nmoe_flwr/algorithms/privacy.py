"""Differential privacy of the correlation matrices FedSC clients share.

Each round a client releases ``R_i = (1 / (P n)) sum_{p, x} z_{p,x} z_{p,x}^T``
over ``P`` augmented passes of its ``n`` samples, with every ``z`` clipped to
norm ``sqrt(mu)`` (:func:`nmoe_flwr.algorithms.fedsc.clip_norm`). Replacing one
sample ``x`` by ``x'`` changes each of its ``P`` terms by
``(z z^T - z' z'^T) / (P n)``, and ``||z z^T - z' z'^T||_F^2 = |z|^4 + |z'|^4
- 2 (z . z')^2 <= 2 mu^2``, so ``R_i`` moves by at most ``sqrt(2) mu / n``
(reached by orthogonal ``z``, ``z'`` on the clipping sphere): the L2
sensitivity of the release. The triangle inequality gives ``2 mu / n``, which
over-states it by ``sqrt(2)`` and so adds ``sqrt(2)`` times more noise than the
budget needs (our earlier versions did; issue 11). The Gaussian mechanism adds
i.i.d. ``N(0, (z * sensitivity)^2)`` to every entry; the noise multiplier
``z`` for a target ``(epsilon, delta)`` over all planned releases, and the
epsilon actually spent, come from opacus' RDP accountant (full
participation per release: sample rate 1).

Only the matrices are protected: the model weights that FedSC also shares
are not (as in the NMoE paper).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def correlation_sensitivity(mu: float, num_samples: int) -> float:
    """L2 (Frobenius) sensitivity ``sqrt(2) mu / n`` of a clipped correlation matrix (tight)."""
    return math.sqrt(2.0) * mu / num_samples


@dataclass(frozen=True)
class GaussianMechanism:
    """Noise multiplier and delta of the correlation-matrix releases.

    ``noise_multiplier = 0`` means no noise (``dp-epsilon = inf``).
    """

    noise_multiplier: float
    delta: float

    @classmethod
    def for_budget(cls, epsilon: float, delta: float, releases: int) -> GaussianMechanism:
        """The smallest noise that keeps ``releases`` releases within ``(epsilon, delta)``."""
        if math.isinf(epsilon):
            return cls(0.0, delta)
        from opacus.accountants.utils import get_noise_multiplier

        z = get_noise_multiplier(
            target_epsilon=epsilon, target_delta=delta, sample_rate=1.0, steps=releases, accountant="rdp"
        )
        return cls(float(z), delta)

    def epsilon(self, releases: int) -> float:
        """Epsilon spent after ``releases`` releases (RDP accounting); inf without noise."""
        if self.noise_multiplier == 0.0:
            return math.inf
        if releases == 0:
            return 0.0
        from opacus.accountants import RDPAccountant

        accountant = RDPAccountant()
        for _ in range(releases):
            accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=1.0)
        return float(accountant.get_epsilon(self.delta))

    def noise_std(self, mu: float, num_samples: int) -> float:
        """Per-entry standard deviation of the noise for a client with ``num_samples``."""
        return self.noise_multiplier * correlation_sensitivity(mu, num_samples)


def privatize(r: Tensor, std: float, generator: torch.Generator) -> Tensor:
    """``R + N(0, std^2)`` entry-wise (``std = 0`` returns ``R`` unchanged)."""
    if std == 0.0:
        return r
    return r + std * torch.randn(r.shape, generator=generator, device=r.device, dtype=r.dtype)
