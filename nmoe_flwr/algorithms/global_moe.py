"""A client's round of the capacity-aware global MoE (the alignment pipeline).

One gate over ``num-experts`` experts on cached latents; each round a client
trains the gate and only the experts the server assigned it, with routing
restricted to them, and reports the feedback the server's fitness and usage
scores need (:mod:`nmoe_flwr.algorithms.alignment`). The server's side is
:class:`nmoe_flwr.strategies.ExpertAssignment`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import RunConfig
from .models import GlobalMoE, ResNet20, mixture_nll
from .seeding import derive_seed, generator, seeded
from .training import FitStats, Runtime, classification_metrics, fit, make_optimizers


def new_global_moe(hidden: int, num_classes: int, num_experts: int, seed: int) -> GlobalMoE:
    """A freshly initialised global MoE over ``num_experts`` experts (seeded)."""
    with seeded(seed):
        return GlobalMoE(ResNet20.out_dim, hidden, num_classes, num_experts)


@torch.no_grad()
def per_expert_loss(model: GlobalMoE, h: Tensor, y: Tensor, allowed: Sequence[int]) -> dict[int, tuple[float, int]]:
    """For every allowed expert: its mean cross entropy on the samples the
    restricted router sends it (top-1), and how many those are (``(0.0, 0)``
    for an expert that gets none)."""
    model.eval()
    _, top = model(h, 1, allowed)
    out = {}
    for j in allowed:
        rows = top == j
        n = int(rows.sum())
        loss = float(nn.functional.cross_entropy(model.experts[j](h[rows]).float(), y[rows])) if n else 0.0
        out[j] = (loss, n)
    return out


@dataclass(frozen=True)
class MoERoundFeedback:
    """What a client's global-MoE round reports to the server.

    Attributes
    ----------
    stats : FitStats
        Loss, accuracy, examples and seconds of the local training.
    routed : dict
        Assigned expert -> training samples the restricted router sends it
        after training (top-1).
    improvement : dict
        Assigned expert -> relative loss improvement ``(l_before - l_after) /
        l_before`` on the samples routed to it (0 where it had no samples
        before or after, or ``l_before`` is 0).
    routing_share : list of float
        Length-E share of the samples the *unrestricted* router sends to
        each expert (the client's preference).
    """

    stats: FitStats
    routed: dict[int, int]
    improvement: dict[int, float]
    routing_share: list[float]


def train_moe_round(
    model: GlobalMoE, allowed: Sequence[int], h: Tensor, y: Tensor, cfg: RunConfig, runtime: Runtime, seed: int
) -> MoERoundFeedback:
    """One round of a client's global-MoE training, restricted to its experts
    (``moe-train-top-k`` of them per sample, ``gate-noise``, AdamW at
    ``moe-lr`` for ``moe-local-epochs``)."""
    before = per_expert_loss(model, h, y, allowed)
    noise = generator(derive_seed(seed, "noise"), runtime.device)

    def loss_fn(m: nn.Module, batch: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        hb, yb = batch
        probs, _ = m(hb, cfg.moe_train_top_k, allowed, cfg.gate_noise, noise)
        return mixture_nll(probs, yb), (probs.argmax(1) == yb).sum()

    opts = make_optimizers(model, "adamw", cfg.moe_lr, weight_decay=cfg.weight_decay)
    stats = fit(
        model, loss_fn, (h, y), epochs=cfg.moe_local_epochs, batch_size=cfg.batch_size,
        optimizers=opts, runtime=runtime, generator=generator(seed, runtime.device),
    )
    after = per_expert_loss(model, h, y, allowed)
    with torch.no_grad():
        model.eval()
        _, top = model(h, 1)
        share = torch.bincount(top, minlength=len(model.experts)).float() / h.shape[0]
    return MoERoundFeedback(
        stats=stats,
        routed={j: after[j][1] for j in allowed},
        improvement={j: _relative_gain(before[j], after[j]) for j in allowed},
        routing_share=share.cpu().tolist(),
    )


def _relative_gain(before: tuple[float, int], after: tuple[float, int]) -> float:
    """``(l_before - l_after) / l_before`` of one expert, 0 unless it had samples
    (and a positive loss) both before and after: an expert the router stopped
    using did not improve, it lost its samples."""
    (l0, n0), (l1, n1) = before, after
    return (l0 - l1) / l0 if n0 and n1 and l0 > 0 else 0.0


@torch.no_grad()
def moe_metrics(model: GlobalMoE, h: Tensor, y: Tensor, num_classes: int, k: int) -> dict[str, float]:
    """Accuracy and macro-F1 of the global MoE with top-k routing over all experts."""
    model.eval()
    probs, _ = model(h, k)
    return classification_metrics(probs.argmax(1), y, num_classes)
