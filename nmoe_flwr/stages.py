"""What one client (or the centralized baseline) computes in each stage.

Plain torch, no Flower: the ClientApp adapts these functions to messages, the
benchmarks call them in a plain process, and the GPU machine (which has no
``flwr``) can run them directly. Every function trains with
:func:`nmoe_flwr.training.fit` and scores with :func:`nmoe_flwr.training.evaluate`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import RunConfig
from .constants import ACCURACY, BYTES_PER_SAMPLE, MACRO_F1, ROUTED_TO_NEIGHBOUR
from .data import ImageSet
from .data.augment import (
    color_jitter_grayscale,
    random_crop_flip,
    random_resized_crop_flip,
    two_views,
)
from .models import (
    MLP,
    CentralizedMoE,
    Classifier,
    Gate,
    GlobalMoE,
    ResNet20,
    mixture_nll,
    mixture_probs,
    route,
)
from .seeding import derive_seed, generator, seeded
from .ssl import SSLModel, clip_norm, spectral_loss
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
    """
    k = cfg.gate_oof_folds
    order = torch.randperm(latents.shape[0], generator=generator(seed), device="cpu").to(latents.device)
    probs = torch.empty(latents.shape[0], 0, device=latents.device)
    for fold, held in enumerate(order.chunk(k)):
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

    Runs the serverless :class:`~nmoe_flwr.inference.router.Router` with an
    in-process transport (the code path of ``nmoe infer``), so it also counts
    the bytes the latents and answers would take on the wire (fp32). Returns
    accuracy, macro-F1, the share of samples that must leave the device (at
    least one picked expert is a neighbour's) and bytes sent per sample.
    """
    from .inference.router import InProcessTransport, Router

    gate.eval()
    router = Router(gate, own_expert, experts[own_expert], InProcessTransport(dict(enumerate(experts))), k=k)
    try:
        batch = router.classify_latents(latents.float().cpu())
    finally:
        router.close()
    metrics = classification_metrics(batch.probs.argmax(1), labels, num_classes)
    metrics[ROUTED_TO_NEIGHBOUR] = float((batch.experts != own_expert).any(dim=1).float().mean())
    metrics[BYTES_PER_SAMPLE] = batch.bytes_sent / max(latents.shape[0], 1)
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


# --- Stage 1 alternative: FedSC ----------------------------------------------


def new_ssl_model(cfg: RunConfig, in_channels: int, seed: int) -> SSLModel:
    """A freshly initialised extractor + projector (seeded)."""
    with seeded(seed):
        return SSLModel(in_channels, cfg.fedsc_proj_dim)


def _one_view(x: Tensor, g: torch.Generator) -> Tensor:
    v = random_resized_crop_flip(x, g)
    return color_jitter_grayscale(v, g) if x.shape[1] == 3 else v


@torch.no_grad()
def fedsc_correlation(model: SSLModel, x: Tensor, cfg: RunConfig, runtime: Runtime, seed: int) -> Tensor:
    """A client's correlation matrix ``R_i`` under the current weights.

    ``(1 / (P n)) sum_{p, x} z z^T`` over ``P = fedsc-corr-passes`` augmented
    passes of its ``n`` samples, every ``z`` clipped to norm ``sqrt(mu)``
    (which bounds the sensitivity, :mod:`nmoe_flwr.privacy`).
    """
    model.eval()
    g = generator(seed, runtime.device)
    d = cfg.fedsc_proj_dim
    acc = torch.zeros(d, d, device=runtime.device, dtype=torch.float64)
    for _ in range(cfg.fedsc_corr_passes):
        for start in range(0, x.shape[0], cfg.fedsc_batch_size * 2):
            view = _one_view(x[start : start + cfg.fedsc_batch_size * 2], g)
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
        v0, v1 = two_views(batch[0], g)
        z0, z1 = m(runtime.inputs(v0)), m(runtime.inputs(v1))
        return spectral_loss(z0, z1, alpha, r_ext, cfg.fedsc_mu), torch.zeros((), device=v0.device)

    opts = make_optimizers(model, "sgd", lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return fit(
        model, loss_fn, (x,),
        epochs=cfg.fedsc_local_epochs, batch_size=cfg.fedsc_batch_size, optimizers=opts, runtime=runtime,
        generator=generator(seed, runtime.device), grad_clip=cfg.fedsc_grad_clip,
    )


def fedsc_round_lr(cfg: RunConfig, server_round: int, num_rounds: int) -> float:
    """FedSC learning rate: cosine decay over the rounds from ``fedsc-lr``."""
    return cfg.fedsc_lr * cosine((server_round - 1) / max(num_rounds, 1))


@torch.no_grad()
def knn_metrics(
    train_h: Tensor, train_y: Tensor, test_h: Tensor, test_y: Tensor, num_classes: int, k: int, temperature: float = 0.07
) -> dict[str, float]:
    """Weighted kNN probe of an extractor (Wu et al. 2018): cosine similarity
    to the client's labelled training latents, votes ``exp(sim / T)`` of the
    ``k`` nearest. Accuracy and macro-F1 on the test latents."""
    a = nn.functional.normalize(train_h.float(), dim=1)
    b = nn.functional.normalize(test_h.float(), dim=1)
    sim, idx = (b @ a.T).topk(min(k, a.shape[0]), dim=1)  # (n_test, k)
    votes = torch.zeros(b.shape[0], num_classes, device=b.device)
    votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
    return classification_metrics(votes.argmax(1), test_y, num_classes)


# --- Capacity-aware global MoE (alignment) -----------------------------------


def new_global_moe(cfg: RunConfig, num_classes: int, seed: int) -> GlobalMoE:
    """A freshly initialised global MoE over ``num-experts`` experts (seeded)."""
    with seeded(seed):
        return GlobalMoE(ResNet20.out_dim, cfg.mlp_hidden, num_classes, cfg.num_experts)


@torch.no_grad()
def per_expert_loss(model: GlobalMoE, h: Tensor, y: Tensor, allowed: Sequence[int]) -> dict[int, tuple[float, int]]:
    """For every allowed expert: its mean cross entropy on the samples the
    restricted router sends it (top-1), and how many those are."""
    model.eval()
    _, top = model(h, 1, allowed)
    out = {}
    for j in allowed:
        rows = top == j
        n = int(rows.sum())
        loss = float(nn.functional.cross_entropy(model.experts[j](h[rows]).float(), y[rows])) if n else 0.0
        out[j] = (loss, n)
    return out


def train_moe_round(
    model: GlobalMoE, allowed: Sequence[int], h: Tensor, y: Tensor, cfg: RunConfig, runtime: Runtime, seed: int
) -> dict[str, object]:
    """One round of a client's global-MoE training, restricted to its experts.

    Returns the fit statistics and the feedback the server's scores need:
    per assigned expert the samples routed to it and the relative loss
    improvement, and the share of samples the *unrestricted* router sends to
    every expert (its preference).
    """
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
    return {
        "stats": stats,
        "routed": {j: after[j][1] for j in allowed},
        "improvement": {j: (before[j][0] - after[j][0]) / before[j][0] if before[j][0] > 0 else 0.0 for j in allowed},
        "routing-share": share.cpu().tolist(),
    }


@torch.no_grad()
def moe_metrics(model: GlobalMoE, h: Tensor, y: Tensor, num_classes: int, k: int) -> dict[str, float]:
    """Accuracy and macro-F1 of the global MoE with top-k routing over all experts."""
    model.eval()
    probs, _ = model(h, k)
    return classification_metrics(probs.argmax(1), y, num_classes)
