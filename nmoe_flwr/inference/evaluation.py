"""The training-time NMoE evaluation, through the same Router as ``nmoe infer``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..algorithms.models import Gate
from ..algorithms.routing import routing_diagnostics
from ..algorithms.training import classification_metrics
from ..constants import BYTES_PER_SAMPLE, ROUTED_TO_NEIGHBOUR
from .router import InProcessTransport, Router


@torch.no_grad()
def nmoe_metrics(
    gate: Gate,
    experts: Sequence[nn.Module],
    latents: Tensor,
    labels: Tensor,
    own_expert: int,
    num_classes: int,
    k: int,
    owners: Mapping[int, Sequence[int]] | None = None,
) -> dict[str, float]:
    """NMoE prediction with plain top-k routing over all experts.

    Runs the serverless :class:`~nmoe_flwr.inference.router.Router` with an
    in-process transport (the code path of ``nmoe infer``), so it also counts
    the bytes the latents and answers would take on the wire (fp32).

    Returns
    -------
    dict
        Accuracy, macro-F1, the share of samples that must leave the device
        (at least one picked expert is a neighbour's) and bytes sent per
        sample; with ``owners`` (label skew) also where the top-1 expert of
        minority and dominant samples is
        (:func:`~nmoe_flwr.algorithms.routing.routing_diagnostics`).
    """
    gate.eval()
    reachable = {j: e for j, e in enumerate(experts) if e is not None}  # a lost expert answers nobody
    router = Router(gate, own_expert, experts[own_expert], InProcessTransport(reachable), k=k)
    try:
        batch = router.classify_latents(latents.float().cpu())
    finally:
        router.close()
    metrics = classification_metrics(batch.probs.argmax(1), labels, num_classes)
    if owners is not None:
        metrics.update(routing_diagnostics(batch.experts[:, 0], labels, own_expert, owners, num_classes))
    metrics[ROUTED_TO_NEIGHBOUR] = float((batch.experts != own_expert).any(dim=1).float().mean())
    metrics[BYTES_PER_SAMPLE] = batch.bytes_sent / max(latents.shape[0], 1)
    return metrics
