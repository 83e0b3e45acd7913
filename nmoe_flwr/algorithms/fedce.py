"""Stage 1 by FedCE: a client's cross-entropy training of the end-to-end classifier.

Each client trains ``H(F(x))`` on its labelled data; the server averages the
extractor ``F`` (and, with ``fedce-average-head``, the head ``H``) with
:class:`nmoe_flwr.strategies.PartialFedAvg` (NMoE paper, Sec. III-A, Eq. 1).
The same local step trains the local-classifier baseline.
"""

from __future__ import annotations

import torch

from ..config import RunConfig
from ..data.registry import PixelStats
from .models import Classifier
from .seeding import generator, seeded
from .training import (
    DeviceData,
    FitStats,
    Runtime,
    ce_loss,
    cosine,
    crop_flip,
    evaluate,
    fit,
    make_optimizers,
)


def new_classifier(stats: PixelStats, num_classes: int, hidden: int, seed: int) -> Classifier:
    """A freshly initialised ResNet20 + MLP classifier (seeded)."""
    with seeded(seed):
        return Classifier(stats, num_classes, hidden)


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
) -> FitStats:
    """SGD with momentum on cross entropy (FedCE's local step, the local baseline).

    Uses ``momentum``, ``weight-decay``, ``batch-size`` and ``augment`` of
    ``cfg``. ``lr_schedule`` applies a cosine decay over these ``epochs``;
    FedCE instead passes each round's cosine value as a constant ``lr``
    (:func:`fedce_round_lr`).
    """
    opts = make_optimizers(model, "sgd", lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return fit(
        model, ce_loss, (data.x, data.y),
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
