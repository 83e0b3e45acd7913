"""Probes of a stage-1 extractor's features (the extractor itself is not trained).

Judging an extractor under label skew needs pooled data (DESIGN.md section
4): a per-client kNN whose memory is one client's 900:11 skewed data measures
the skew, not the features. :func:`probe_features` therefore trains kNN,
linear and MLP probes on *all* clients' labelled features pooled and scores
them on the pooled test set and on a class-balanced one; run on raw pixels
and on a random-init extractor it gives the floors an extractor must beat.
:func:`prior_adjusted` turns a pooled classifier into the router ceiling: the
pooled posterior re-weighted by each client's class prior (Bayes' rule under
label shift), the best any client's gate could do on these features.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .seeding import generator, seeded
from .training import (
    Runtime,
    ce_loss,
    classification_metrics,
    cosine,
    fit,
    make_optimizers,
    predict,
    torch_threads,
)


@torch.no_grad()
def knn_metrics(
    train_h: Tensor, train_y: Tensor, test_h: Tensor, test_y: Tensor, num_classes: int, k: int, temperature: float = 0.07
) -> dict[str, float]:
    """Weighted kNN probe of an extractor (Wu et al. 2018).

    Cosine similarity of every test latent to the labelled training latents;
    the ``k`` nearest vote for their labels with weight ``exp(sim / T)``.

    Returns
    -------
    dict
        Accuracy and macro-F1 on the test latents.
    """
    a = nn.functional.normalize(train_h.float(), dim=1)
    votes = torch.zeros(test_h.shape[0], num_classes, device=test_h.device)
    for start in range(0, test_h.shape[0], 2048):  # bounded memory for large pooled test sets
        b = nn.functional.normalize(test_h[start : start + 2048].float(), dim=1)
        sim, idx = (b @ a.T).topk(min(k, a.shape[0]), dim=1)  # (n_test, k)
        votes[start : start + b.shape[0]].scatter_add_(1, train_y[idx], (sim / temperature).exp())
    return classification_metrics(votes.argmax(1), test_y, num_classes)


def standardize(train: Tensor, *others: Tensor) -> tuple[Tensor, ...]:
    """Features scaled by the training set's per-dimension mean and std (probes train better)."""
    mean, std = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp_min(1e-6)
    return tuple((t - mean) / std for t in (train, *others))


PROBE_BATCH = 256


def train_probe(
    train_h: Tensor, train_y: Tensor, num_classes: int, hidden: int, runtime: Runtime, seed: int, steps: int = 800
) -> nn.Module:
    """A linear (``hidden = 0``) or one-hidden-layer MLP probe on fixed features
    (AdamW 3e-3, weight decay 1e-4, cosine LR, batch 256, about ``steps``
    steps whatever the data size, so probes of small and large runs are
    trained alike)."""
    d = train_h.shape[1]
    epochs = max(1, math.ceil(steps * PROBE_BATCH / train_h.shape[0]))
    with seeded(seed):
        model = nn.Linear(d, num_classes) if hidden == 0 else nn.Sequential(
            nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )
    model = model.to(runtime.device)
    opts = make_optimizers(model, "adamw", 3e-3, weight_decay=1e-4)
    # One thread on the CPU: the steps are tiny, and OpenMP's barriers between two threads cost more than
    # they save; on a busy 2-core box two threads were 9x slower (a smoke run's probes: 325 s instead of ~30).
    with torch_threads(1) if runtime.device.type == "cpu" else contextlib.nullcontext():
        fit(model, ce_loss, (train_h, train_y), epochs=epochs, batch_size=PROBE_BATCH, optimizers=opts, runtime=runtime,
            generator=generator(seed, runtime.device), lr_multiplier=cosine)
    return model.eval()


def class_balanced(labels: Tensor, num_classes: int, seed: int) -> Tensor:
    """Indices of a class-balanced subset: every class cut to the rarest class's count."""
    g = generator(seed)
    per = min(int((labels == c).sum()) for c in range(num_classes))
    picks = [torch.nonzero(labels.cpu() == c).flatten()[torch.randperm(int((labels == c).sum()), generator=g)[:per]]
             for c in range(num_classes)]
    return torch.cat(picks).sort().values


def probe_features(
    train_h: Tensor,
    train_y: Tensor,
    test_h: Tensor,
    test_y: Tensor,
    num_classes: int,
    runtime: Runtime,
    *,
    k: int = 20,
    hidden: int = 256,
    seed: int = 0,
    steps: int = 800,
) -> dict[str, float]:
    """kNN, linear and MLP probes trained on pooled features, scored on the
    pooled test set and on a class-balanced subset of it.

    Returns
    -------
    dict
        ``"<probe>-<test>-<metric>"`` for probe in (knn, linear, mlp), test in
        (pooled, balanced), metric in (accuracy, macro-f1).
    """
    balanced = class_balanced(test_y, num_classes, seed).to(test_y.device)
    out: dict[str, float] = {}
    answers = {"knn": None}
    tr, te = standardize(train_h.float(), test_h.float())
    for name, hid in (("linear", 0), ("mlp", hidden)):
        probe = train_probe(tr, train_y, num_classes, hid, runtime, seed, steps)
        answers[name] = predict(probe, te, 4096, runtime).argmax(1)
    for test, rows in (("pooled", slice(None)), ("balanced", balanced)):
        for name, pred in answers.items():
            metrics = (
                knn_metrics(train_h, train_y, test_h[rows], test_y[rows], num_classes, k) if name == "knn"
                else classification_metrics(pred[rows], test_y[rows], num_classes)
            )
            out |= {f"{name}-{test}-{m}": v for m, v in metrics.items()}
    return out


@torch.no_grad()
def prior_adjusted(probs: Tensor, prior: Tensor, pooled_prior: Tensor) -> Tensor:
    """``p_i(y | h) ∝ p(y | h) pi_i(y) / pi(y)``: a pooled posterior moved to a
    client's class prior ``pi_i`` (label shift; Saerens et al. 2002)."""
    w = probs * (prior / pooled_prior.clamp_min(1e-12)).unsqueeze(0)
    return w / w.sum(1, keepdim=True).clamp_min(1e-12)


def router_ceiling(
    train_h: Tensor,
    train_y: Tensor,
    client_tests: Sequence[tuple[Tensor, Tensor]],
    client_priors: Sequence[Tensor],
    num_classes: int,
    runtime: Runtime,
    *,
    hidden: int = 256,
    seed: int = 0,
    steps: int = 800,
) -> list[dict[str, float]]:
    """The best a client's router could do on these features: an MLP trained
    on all clients' pooled latents, its posterior moved to each client's
    class prior, scored on each client's test latents.

    Returns
    -------
    list of dict
        Accuracy and macro-F1 per client, in order.
    """
    tr, *tests = standardize(train_h.float(), *(h.float() for h, _ in client_tests))
    probe = train_probe(tr, train_y, num_classes, hidden, runtime, seed, steps)
    pooled_prior = torch.bincount(train_y, minlength=num_classes).float() / train_y.numel()
    out = []
    for te, (_, y), prior in zip(tests, client_tests, client_priors):
        probs = predict(probe, te, 4096, runtime).softmax(1)
        pred = prior_adjusted(probs, prior.to(probs.device), pooled_prior.to(probs.device)).argmax(1)
        out.append(classification_metrics(pred, y, num_classes))
    return out
