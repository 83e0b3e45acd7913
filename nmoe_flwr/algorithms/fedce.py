"""Stage 1 by FedCE: a client's cross-entropy training of the end-to-end classifier.

Each client trains ``H(F(x))`` on its labelled data; the server averages the
extractor ``F`` (and, with ``fedce-average-head``, the head ``H``) with
:class:`nmoe_flwr.strategies.PartialFedAvg` (NMoE paper, Sec. III-A, Eq. 1).
The same local step trains the local-classifier baseline.

Ours, not the paper's: ``fedce-logit-adjust`` (tau) trains each client on
``CE(logits + tau * log pi_i(y))`` with ``pi_i`` its own label distribution
(logit adjustment, Menon et al., ICLR 2021; in FL, FedLC, Zhang et al., ICML
2022). Under label skew a plain local step pulls the shared head and the
features toward the client's dominant class, and the average of ten such
pulls is a poor model of any class; with the prior added to the logits the
local optimum is the prior-free ``p(x | y)`` part, which is the same on every
client, so the average is consistent. ``tau = 0`` is the paper's FedCE.

Also ours, an option for drift control: ``fedce-prox-mu`` adds FedProx's
proximal term (Li et al., MLSys 2020) to the local loss; 0, the default, is
the paper's FedCE.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..config import RunConfig
from ..data.registry import PixelStats
from .models import Classifier
from .seeding import generator, seeded
from .training import (
    DeviceData,
    FitStats,
    LossFn,
    Runtime,
    ce_loss,
    cosine,
    crop_flip,
    evaluate,
    fit,
    log_prior,
    make_optimizers,
)


def new_classifier(stats: PixelStats, num_classes: int, hidden: int, seed: int, norm: str = "batch") -> Classifier:
    """A freshly initialised ResNet20 + MLP classifier (seeded; ``norm`` of the ResNet20)."""
    with seeded(seed):
        return Classifier(stats, num_classes, hidden, norm)


def logit_adjusted_ce(offset: Tensor) -> LossFn:
    """Cross entropy of ``logits + offset`` (``offset = tau * log pi_i``):
    the :data:`LossFn` of logit-adjusted FedCE. Accuracy is counted on the
    adjusted logits, i.e. under the client's own prior."""

    def loss_fn(model: nn.Module, batch: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        x, y = batch
        logits = model(x).float() + offset
        return nn.functional.cross_entropy(logits, y), (logits.argmax(1) == y).sum()

    return loss_fn


def proximal(loss_fn: LossFn, model: nn.Module, mu: float, prefixes: Sequence[str]) -> LossFn:
    """FedProx's local objective: ``loss_fn`` plus ``mu / 2 * ||w - w_t||^2``.

    ``w`` are the trainable parameters of ``model`` whose names start with one
    of ``prefixes`` (what the server averages), ``w_t`` their values when
    this is called, i.e. the server's weights of the round (Li et al.,
    "Federated Optimization in Heterogeneous Networks", MLSys 2020, Eq. 2).
    Parameters the client keeps local are not pulled anywhere. The loss
    :func:`fit` reports then includes the proximal term. The returned loss
    is for ``model`` only: the pairs ``(w, w_t)`` are taken here, once.
    """
    if mu < 0:
        raise ValueError(f"the proximal weight mu must be >= 0, got {mu}")
    pulled = [(p, p.detach().clone()) for n, p in model.named_parameters() if p.requires_grad and n.startswith(tuple(prefixes))]
    if not pulled:
        tops = sorted({n.split(".")[0] + "." for n, p in model.named_parameters() if p.requires_grad})
        raise ValueError(f"no trainable parameter of the model starts with any of {list(prefixes)}; its prefixes are {tops}")

    def loss_fn_prox(m: nn.Module, batch: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        loss, correct = loss_fn(m, batch)
        drift = sum((w - w_t).pow(2).sum() for w, w_t in pulled)
        return loss + 0.5 * mu * drift, correct

    return loss_fn_prox


def train_classifier(
    model: Classifier,
    data: DeviceData,
    cfg: RunConfig,
    runtime: Runtime,
    *,
    epochs: int,
    lr: float,
    seed: int,
    lr_schedule: bool = False,
    logit_adjust: float = 0.0,
    prox_mu: float = 0.0,
    shared_prefixes: Sequence[str] = (),
) -> FitStats:
    """SGD with momentum on cross entropy (FedCE's local step, the local baseline).

    Uses ``momentum``, ``weight-decay``, ``batch-size`` and ``augment`` of
    ``cfg``. ``lr_schedule`` applies a cosine decay over these ``epochs``;
    FedCE instead passes each round's cosine value as a constant ``lr``
    (:func:`fedce_round_lr`). ``logit_adjust`` (tau > 0) trains on
    ``logits + tau * log pi(y)`` with ``pi`` the label distribution of ``data``
    (:func:`logit_adjusted_ce`); 0 is plain cross entropy. ``prox_mu > 0``
    adds FedProx's pull toward the current values of the parameters named
    by ``shared_prefixes`` (:func:`proximal`).
    """
    opts = make_optimizers(model, "sgd", lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    loss_fn = ce_loss
    if logit_adjust > 0:
        loss_fn = logit_adjusted_ce(logit_adjust * log_prior(data.y, model.num_classes))
    if prox_mu > 0:
        loss_fn = proximal(loss_fn, model, prox_mu, shared_prefixes)
    return fit(
        model, loss_fn, (data.x, data.y),
        epochs=epochs, batch_size=cfg.batch_size, optimizers=opts, runtime=runtime,
        generator=generator(seed, runtime.device), augment=crop_flip(cfg.augment),
        lr_multiplier=cosine if lr_schedule else None,
    )


def fedce_round_lr(base_lr: float, server_round: int, num_rounds: int) -> float:
    """Learning rate of a FedCE round: cosine decay over the rounds, constant within one."""
    return base_lr * cosine((server_round - 1) / max(num_rounds, 1))


@torch.no_grad()
def classifier_metrics(
    model: Classifier, test: DeviceData, num_classes: int, batch_size: int, runtime: Runtime
) -> dict[str, float]:
    """Accuracy and macro-F1 of an end-to-end classifier (eval mode)."""
    model.eval()
    return evaluate(model, test.x, test.y, num_classes, batch_size, runtime)
