"""Probes of a stage-1 extractor's features (no training of the extractor)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .training import classification_metrics


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
    b = nn.functional.normalize(test_h.float(), dim=1)
    sim, idx = (b @ a.T).topk(min(k, a.shape[0]), dim=1)  # (n_test, k)
    votes = torch.zeros(b.shape[0], num_classes, device=b.device)
    votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
    return classification_metrics(votes.argmax(1), test_y, num_classes)
