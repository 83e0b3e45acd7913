"""Stage 2: personalized experts on cached latents of the frozen extractor.

Each client computes ``h = F(x)`` once and trains its expert ``H_i`` on its
own labelled latents (NMoE paper, Sec. III-B), fine-tuned from the FedCE
head or from scratch. For stage 3 it also cross-fits its expert's answers on
its own training set (:func:`out_of_fold_probs`), our addition.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from ..config import RunConfig
from .models import MLP, ResNet20
from .seeding import derive_seed, generator, seeded
from .training import FitStats, Runtime, ce_loss, cosine, fit, make_optimizers, predict


def new_expert(num_classes: int, hidden: int, seed: int) -> MLP:
    """A freshly initialised expert on ResNet20 latents (seeded)."""
    with seeded(seed):
        return MLP(ResNet20.out_dim, hidden, num_classes)


def frozen_bank(
    states: Mapping[int, dict[str, Tensor]], num_experts: int, hidden: int, num_classes: int, runtime: Runtime
) -> list[MLP | None]:
    """The frozen expert bank of stage 3, indexed by expert id ``0 .. num_experts - 1``.

    One eval-mode, gradient-free expert per state dict of ``states``
    (``{expert id: state}``), on ``runtime.device``; ``None`` where an expert
    is missing (its client's stage-2 reply was lost): routing masks it
    (:func:`nmoe_flwr.algorithms.gate.mask_missing`) and never picks it.
    """
    bank: list[MLP | None] = [None] * num_experts
    for j, state in states.items():
        expert = MLP(ResNet20.out_dim, hidden, num_classes)
        expert.load_state_dict(state)
        bank[j] = runtime.prepare(expert).eval().requires_grad_(False)
    return bank


def compute_latents(extractor: nn.Module, x: Tensor, batch_size: int, runtime: Runtime) -> Tensor:
    """``F(x)`` for a whole data set, once (stages 2 and 3 train on these)."""
    extractor.eval()
    return predict(extractor, x, batch_size, runtime)


def train_expert(
    expert: MLP, latents: Tensor, labels: Tensor, cfg: RunConfig, runtime: Runtime, seed: int
) -> FitStats:
    """Fine-tune a personalized expert on cached latents (AdamW, cosine LR,
    ``expert-epochs``, ``expert-lr``, ``weight-decay``, ``batch-size``)."""
    opts = make_optimizers(expert, "adamw", cfg.expert_lr, weight_decay=cfg.weight_decay)
    return fit(
        expert, ce_loss, (latents, labels),
        epochs=cfg.expert_epochs, batch_size=cfg.batch_size, optimizers=opts,
        runtime=runtime, generator=generator(seed, runtime.device), lr_multiplier=cosine,
    )


def out_of_fold_probs(
    make_expert: Callable[[], nn.Module], latents: Tensor, labels: Tensor, cfg: RunConfig, runtime: Runtime, seed: int
) -> Tensor:
    """Cross-fitted class probabilities of a client's own expert on its training set.

    The gate is trained on the client's training samples, on which the
    client's own expert was fitted: its answers there are overconfident
    (memorised minority-class samples look solved), and a gate trained on
    them learns to never route away. With ``gate-oof-folds = K`` the client
    trains K fold experts on ``(K-1)/K`` of its latents each (same init and
    recipe as its expert) and predicts the held-out fold; the gate sees these
    honest answers for the own expert. Cheap: experts train on cached latents.

    Returns
    -------
    Tensor
        ``(N, C)`` probabilities; row ``i`` comes from the fold expert that
        did not see sample ``i``.
    """
    k = cfg.gate_oof_folds
    order = torch.randperm(latents.shape[0], generator=generator(seed), device="cpu").to(latents.device)
    probs = torch.empty(latents.shape[0], 0, device=latents.device)
    # tensor_split always gives k folds (sizes differ by at most one); chunk may give fewer.
    for fold, held in enumerate(order.tensor_split(k)):
        keep = torch.ones(latents.shape[0], dtype=torch.bool, device=latents.device)
        keep[held] = False
        expert = runtime.prepare(make_expert())
        train_expert(expert, latents[keep], labels[keep], cfg, runtime, derive_seed(seed, fold))
        expert.eval()
        with torch.no_grad():
            p = expert(latents[held]).float().softmax(-1)
        if probs.shape[1] == 0:
            probs = torch.zeros(latents.shape[0], p.shape[1], device=latents.device)
        probs[held] = p
    return probs
