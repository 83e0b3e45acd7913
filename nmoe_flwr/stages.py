"""What one client (or the centralized baseline) computes in each stage.

Plain torch, no Flower: the ClientApp adapts these functions to messages, the
benchmarks call them in a plain process, and the GPU machine (which has no
``flwr``) can run them directly. Every function trains with
:func:`nmoe_flwr.training.fit` and scores with :func:`nmoe_flwr.training.evaluate`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import RunConfig
from .constants import ACCURACY, MACRO_F1, ROUTED_TO_NEIGHBOUR
from .data import ImageSet
from .data.augment import random_crop_flip
from .models import (
    MLP,
    CentralizedMoE,
    Classifier,
    Gate,
    ResNet20,
    mixture_nll,
    mixture_probs,
    nmoe_combine,
    route,
)
from .seeding import derive_seed, generator, seeded
from .training import (
    FitStats,
    Runtime,
    ce_loss,
    classification_metrics,
    cosine,
    evaluate,
    fit,
    make_optimizers,
    predict,
)

AUGMENT_PAD = 2  # pixels of random translation (28x28 and 32x32 inputs)


@dataclass(frozen=True)
class DeviceData:
    """A client's labelled data on the training device (images stay uint8)."""

    x: Tensor
    y: Tensor

    @classmethod
    def of(cls, data: ImageSet, runtime: Runtime) -> DeviceData:
        """Copy an :class:`ImageSet` to ``runtime.device`` once."""
        return cls(data.images.to(runtime.device), data.labels.to(runtime.device))


def _augment(cfg: RunConfig):
    return (lambda x, g: random_crop_flip(x, AUGMENT_PAD, g)) if cfg.augment else None


def new_classifier(cfg: RunConfig, in_channels: int, num_classes: int, seed: int) -> Classifier:
    """A freshly initialised ResNet20 + MLP classifier (seeded)."""
    with seeded(seed):
        return Classifier(in_channels, num_classes, cfg.mlp_hidden)


def new_gate(cfg: RunConfig, seed: int) -> Gate:
    """A freshly initialised gate over ``num-clients`` experts (seeded)."""
    with seeded(seed):
        return Gate(ResNet20.out_dim, cfg.mlp_hidden, cfg.num_clients)


def new_expert(cfg: RunConfig, num_classes: int, seed: int) -> MLP:
    """A freshly initialised expert (seeded)."""
    with seeded(seed):
        return MLP(ResNet20.out_dim, cfg.mlp_hidden, num_classes)


# --- Stage 1: FedCE ----------------------------------------------------------


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

    ``lr_schedule`` applies a cosine decay over these ``epochs``; FedCE
    instead passes each round's cosine value as a constant ``lr``.
    """
    opts = make_optimizers(model, "sgd", lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return fit(
        model, ce_loss, (data.x, data.y),
        epochs=epochs, batch_size=cfg.batch_size, optimizers=opts, runtime=runtime,
        generator=generator(seed, runtime.device), augment=_augment(cfg),
        lr_multiplier=cosine if lr_schedule else None,
    )


def fedce_round_lr(cfg: RunConfig, server_round: int, num_rounds: int) -> float:
    """Learning rate of a FedCE round: cosine decay over the rounds, constant within one."""
    return cfg.lr * cosine((server_round - 1) / max(num_rounds, 1))


def classifier_metrics(model: Classifier, test: DeviceData, num_classes: int, cfg: RunConfig, runtime: Runtime) -> dict[str, float]:
    """Accuracy and macro-F1 of an end-to-end classifier."""
    model.eval()
    return evaluate(model, test.x, test.y, num_classes, cfg.batch_size * 4, runtime)


# --- Stage 2: personalized experts ------------------------------------------


def compute_latents(extractor: nn.Module, x: Tensor, cfg: RunConfig, runtime: Runtime) -> Tensor:
    """``F(x)`` for a whole data set, once (stage 2 and 3 train on these)."""
    extractor.eval()
    return predict(extractor, x, cfg.batch_size * 4, runtime)


def train_expert(
    expert: MLP, latents: Tensor, labels: Tensor, cfg: RunConfig, runtime: Runtime, seed: int
) -> FitStats:
    """Fine-tune a personalized expert on cached latents (AdamW, cosine LR)."""
    opts = make_optimizers(expert, "adamw", cfg.expert_lr, weight_decay=cfg.weight_decay)
    return fit(
        expert, ce_loss, (latents, labels),
        epochs=cfg.expert_epochs, batch_size=cfg.batch_size, optimizers=opts,
        runtime=runtime, generator=generator(seed, runtime.device), lr_multiplier=cosine,
    )


# --- Stage 3: gate -----------------------------------------------------------


@torch.no_grad()
def bank_probs(experts: Sequence[nn.Module], latents: Tensor) -> Tensor:
    """``(N, n, C)`` class probabilities of every frozen expert.

    The bank is frozen during stage 3, so its answers are computed once and
    the gate trains on them: each gate step then costs one gate forward.
    """
    return torch.stack([e(latents).float().softmax(-1) for e in experts], dim=1)


def gate_loss(cfg: RunConfig, noise_gen: torch.Generator):
    """Loss of the gate on ``(latents, labels, bank probs)``: mixture NLL under
    noisy top-k routing (``gate-train-top-k`` experts, ``gate-noise``)."""

    def loss_fn(gate: nn.Module, batch: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        h, y, probs = batch
        weights, index = route(gate(h), cfg.train_k, cfg.gate_noise, noise_gen)
        mix = mixture_probs(weights.float(), index, probs)
        return mixture_nll(mix, y), (mix.argmax(1) == y).sum()

    return loss_fn


def train_gate(
    gate: Gate,
    latents: Tensor,
    labels: Tensor,
    probs: Tensor,
    cfg: RunConfig,
    runtime: Runtime,
    *,
    server_round: int,
    num_rounds: int,
    seed: int,
) -> FitStats:
    """One round of local gate training against the frozen bank.

    Muon for the gate's weight matrices and AdamW for its biases (or AdamW
    for all, ``gate-optimizer``), per-tensor gradient normalization when
    ``gate-grad-norm`` (NMoE paper, Sec. III-C), cosine LR over the rounds.
    """
    opts = make_optimizers(gate, cfg.gate_optimizer, cfg.gate_lr, weight_decay=0.0, muon_lr=cfg.gate_muon_lr)
    start = (server_round - 1) / num_rounds
    return fit(
        gate, gate_loss(cfg, generator(derive_seed(seed, "noise"), runtime.device)), (latents, labels, probs),
        epochs=cfg.gate_local_epochs, batch_size=cfg.batch_size, optimizers=opts, runtime=runtime,
        generator=generator(seed, runtime.device), grad_norm=cfg.gate_grad_norm,
        lr_multiplier=lambda p: cosine(start + p / num_rounds),
    )


@torch.no_grad()
def nmoe_metrics(
    gate: Gate,
    experts: Sequence[nn.Module],
    latents: Tensor,
    labels: Tensor,
    own_expert: int,
    num_classes: int,
    k: int,
) -> dict[str, float]:
    """NMoE prediction with plain top-k routing over all experts.

    Returns accuracy, macro-F1 and the share of samples that must leave the
    device (at least one picked expert is a neighbour's).
    """
    gate.eval()
    weights, index = route(gate(latents), k)
    probs = nmoe_combine(latents, weights, index, experts)
    metrics = classification_metrics(probs.argmax(1), labels, num_classes)
    metrics[ROUTED_TO_NEIGHBOUR] = float((index != own_expert).any(dim=1).float().mean())
    return metrics


# --- Centralized MoE upper bound --------------------------------------------


def train_centralized_moe(
    train: DeviceData,
    tests: Sequence[DeviceData],
    in_channels: int,
    num_classes: int,
    cfg: RunConfig,
    runtime: Runtime,
) -> list[dict[str, float]]:
    """Extractor, gate and ``num-clients`` experts trained jointly on pooled data.

    The paper's upper bound: same architectures, same loss as the gate
    (mixture NLL under noisy top-k), same training loop; evaluated with
    top-k routing on each client's test set.
    """
    with seeded(derive_seed(cfg.seed, "centralized-init")):
        model = CentralizedMoE(in_channels, num_classes, cfg.num_clients, cfg.mlp_hidden)
    model = runtime.prepare(model)
    noise = generator(derive_seed(cfg.seed, "centralized-noise"), runtime.device)

    def loss_fn(m: nn.Module, batch: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        x, y = batch
        probs = m(x, cfg.train_k, cfg.gate_noise, noise)
        return mixture_nll(probs, y), (probs.argmax(1) == y).sum()

    opts = make_optimizers(model, "sgd", cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    fit(
        model, loss_fn, (train.x, train.y),
        epochs=cfg.centralized_epochs, batch_size=cfg.batch_size, optimizers=opts, runtime=runtime,
        generator=generator(derive_seed(cfg.seed, "centralized"), runtime.device),
        augment=_augment(cfg), lr_multiplier=cosine,
    )
    model.eval()
    return [
        evaluate(lambda x: model(x, cfg.top_k), t.x, t.y, num_classes, cfg.batch_size * 4, runtime)
        for t in tests
    ]


def mean_metrics(per_client: Mapping[int, Mapping[str, float]], keys: Sequence[str] = (ACCURACY, MACRO_F1)) -> dict[str, float]:
    """Unweighted mean over clients (the paper's "average accuracy and F1")."""
    rows = list(per_client.values())
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys if rows and all(k in r for r in rows)}
