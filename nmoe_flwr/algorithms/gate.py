"""Stage 3: a client's gate, trained against the frozen expert bank (FedGate).

The gate scores all ``n`` experts for a latent; it is trained with the
mixture NLL under noisy top-k routing on precomputed expert answers, with
Muon for its weight matrices and per-tensor gradient normalization (NMoE
paper, Sec. III-C). The server averages the entries ``gate-method`` names
(:class:`nmoe_flwr.strategies.PartialFedAvg`): the paper's FedGate averages
the shallow ``shared.`` layers and keeps the decision layer local; our
default (``"fedavg"`` with ``gate-logit-adjust``, below) averages all
layers and keeps only the prior offset local.

Ours, not the paper's: an optional direct routing target
(``gate-route-weight``), a cross entropy pulling the gate's logits toward
the expert most confident on the true label (:func:`routing_targets`). The
mixture NLL alone moves an expert's logit in proportion to that expert's
current gate weight, so a gate that starts on the own expert rarely learns
to send minority samples away.

Also ours: ``gate-logit-adjust`` (tau) sets the gate's ``log_prior`` to
``tau * log pi_i(j)``, ``pi_i(j)`` the share of the client's training
samples whose routing target is expert ``j`` (:func:`routing_log_prior`).
The offset is added to the logits in training and at inference (logit
adjustment, Menon et al., ICLR 2021). Under label skew the routing target
is a function of the class that is the same on every client (the class
owner's expert); only how often each target occurs differs. With the prior
as a fixed local offset, the trained layers learn the common part, so they
can be averaged, decision layer included (``gate-method = "fedavg"``), and
every client's gate still routes under its own prior.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..config import RunConfig
from .models import Gate, ResNet20, mixture_nll, mixture_probs, route
from .seeding import derive_seed, generator, seeded
from .training import FitStats, LossFn, Runtime, cosine, fit, log_prior, make_optimizers


def new_gate(hidden: int, num_experts: int, seed: int) -> Gate:
    """A freshly initialised gate over ``num_experts`` experts (seeded)."""
    with seeded(seed):
        return Gate(ResNet20.out_dim, hidden, num_experts)


def available(experts: Sequence[nn.Module | None]) -> Tensor:
    """``(n,)`` bool: which experts of the bank exist (``None`` = lost in stage 2)."""
    return torch.tensor([e is not None for e in experts])


def mask_missing(gate: Gate, present: Tensor) -> Gate:
    """Set the gate's ``log_prior`` to ``-inf`` for missing experts, so that no
    routing (training, top-k at inference, the serverless router) picks them."""
    with torch.no_grad():
        gate.log_prior[~present.to(gate.log_prior.device)] = float("-inf")
    return gate


@torch.no_grad()
def bank_probs(experts: Sequence[nn.Module | None], latents: Tensor) -> Tensor:
    """``(N, n, C)`` class probabilities of every frozen expert.

    The bank is frozen during stage 3, so its answers are computed once and
    the gate trains on them: each gate step then costs one gate forward.
    """
    probs = [e(latents).float().softmax(-1) if e is not None else None for e in experts]
    like = next(p for p in probs if p is not None)
    # A missing expert answers nothing: all-zero probabilities, never a routing target.
    return torch.stack([p if p is not None else torch.zeros_like(like) for p in probs], dim=1)


def routing_targets(probs: Tensor, labels: Tensor, own: int | None = None, stay_margin: float = 0.0) -> Tensor:
    """``(N,)`` the expert most confident on each sample's true label,
    ``argmax_j p_j(y | h)`` over ``(N, n, C)`` bank probabilities.

    With ``own`` (the client's own expert) and ``stay_margin`` m > 0 the
    target is ``own`` wherever ``p_own(y | h) >= max_j p_j(y | h) - m``: a
    neighbour has to be *clearly* better on the label to be worth a network
    round trip (ours, ``gate-stay-margin``). m = 0 is the plain argmax.
    """
    on_label = probs.gather(2, labels.view(-1, 1, 1).expand(-1, probs.shape[1], 1)).squeeze(2)
    best, target = on_label.max(1)
    if own is None or stay_margin <= 0:
        return target
    stay = on_label[:, own] >= best - stay_margin
    return torch.where(stay, torch.full_like(target, own), target)


def routing_log_prior(
    probs: Tensor, labels: Tensor, smoothing: float = 1.0, own: int | None = None, stay_margin: float = 0.0
) -> Tensor:
    """``(n,)`` log share of samples whose routing target is each expert
    (:func:`routing_targets`, same ``own`` and ``stay_margin``), with
    ``smoothing`` added to every count."""
    return log_prior(routing_targets(probs, labels, own, stay_margin), probs.shape[1], smoothing)


def gate_loss(
    train_k: int,
    noise_std: float,
    noise_gen: torch.Generator,
    route_weight: float = 0.0,
    own: int | None = None,
    stay_margin: float = 0.0,
) -> LossFn:
    """Loss of the gate on ``(latents, labels, bank probs)``.

    ``-log sum_j w_j p_j(y | h)`` under noisy top-``train_k`` routing with
    noise of std ``noise_std`` (the paper's objective), plus
    ``route_weight * CE(gate logits, routing_targets(own, stay_margin))``
    when ``route_weight > 0``.
    """

    def loss_fn(gate: nn.Module, batch: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        h, y, probs = batch
        logits = gate(h)
        weights, index = route(logits, train_k, noise_std, noise_gen)
        mix = mixture_probs(weights.float(), index, probs)
        loss = mixture_nll(mix, y)
        if route_weight > 0:
            target = routing_targets(probs, y, own, stay_margin)
            loss = loss + route_weight * nn.functional.cross_entropy(logits.float(), target)
        return loss, (mix.argmax(1) == y).sum()

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
    present: Tensor | None = None,
    own: int | None = None,
) -> FitStats:
    """One round of local gate training against the frozen bank.

    Muon for the gate's weight matrices and AdamW for its biases (or AdamW
    for all, ``gate-optimizer``), per-tensor gradient normalization when
    ``gate-grad-norm`` (NMoE paper, Sec. III-C), cosine LR over the rounds,
    the routing target weighted by ``gate-route-weight`` (ours). With
    ``gate-logit-adjust`` > 0 the gate's ``log_prior`` is first set from this
    client's routing targets (ours, :func:`routing_log_prior`). ``own`` is
    the client's own expert, which the targets prefer by ``gate-stay-margin``
    (ours, :func:`routing_targets`). Experts not ``present`` (lost in stage
    2) are masked (:func:`mask_missing`).
    """
    margin = cfg.gate_stay_margin
    if cfg.gate_logit_adjust > 0:
        gate.log_prior.copy_(cfg.gate_logit_adjust * routing_log_prior(probs, labels, own=own, stay_margin=margin))
    if present is not None:  # (again, if the caller masked: the adjustment above overwrote log_prior)
        mask_missing(gate, present)
    opts = make_optimizers(gate, cfg.gate_optimizer, cfg.gate_lr, weight_decay=0.0, muon_lr=cfg.gate_muon_lr)
    start = (server_round - 1) / num_rounds
    noise = generator(derive_seed(seed, "noise"), runtime.device)
    loss_fn = gate_loss(cfg.train_k, cfg.gate_noise, noise, cfg.gate_route_weight, own, margin)
    return fit(
        gate, loss_fn, (latents, labels, probs),
        epochs=cfg.gate_local_epochs, batch_size=cfg.batch_size, optimizers=opts, runtime=runtime,
        generator=generator(seed, runtime.device), grad_norm=cfg.gate_grad_norm,
        lr_multiplier=lambda p: cosine(start + p / num_rounds),
    )
