"""Where a gate sends samples, and what ideal routings would score: diagnostics and oracles.

Under label skew (``partition = "dominant"``) client ``i``'s dominant class
is ``i mod C`` and the client whose dominant class is ``c`` *owns* ``c``
(:func:`class_owners`). NMoE pays off only if a client's gate sends its
minority-class samples to their owners' experts. These functions measure
that (our additions, to see whether the gate routes at all) and bound it:

- :func:`routing_diagnostics`: share of samples routed away, share of
  minority samples routed to an owner of their class, share of
  dominant-class samples sent away;
- :func:`oracle_predictions`: the class-owner oracle (every sample to an
  owner of its true label) and the best-expert oracle (every sample to the
  expert most confident on its true label). Both peek at the label: they
  bound what routing over this expert bank could reach, they are not methods.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..constants import DOMINANT_SENT_AWAY, MINORITY_TO_OWNER, ROUTED_TO_NEIGHBOUR


def dominant_class(client: int, num_classes: int) -> int:
    """Dominant class of ``client`` under ``partition = "dominant"``
    (:func:`nmoe_flwr.data.partition.class_counts`)."""
    return client % num_classes


def class_owners(num_clients: int, num_classes: int) -> dict[int, list[int]]:
    """``class -> clients whose dominant class it is`` (every class has at
    least one owner when ``num_clients >= num_classes``)."""
    owners: dict[int, list[int]] = {c: [] for c in range(num_classes)}
    for i in range(num_clients):
        owners[dominant_class(i, num_classes)].append(i)
    return owners


def routing_diagnostics(
    top1: Tensor, labels: Tensor, own: int, owners: Mapping[int, Sequence[int]], num_classes: int
) -> dict[str, float]:
    """Where one client's gate sends its samples (top-1 expert per sample).

    Parameters
    ----------
    top1 : Tensor
        ``(N,)`` expert picked first for every sample.
    labels : Tensor
        ``(N,)`` true classes.
    own : int
        This client's id (its own expert).
    owners : mapping
        :func:`class_owners`.

    Returns
    -------
    dict
        ``routed-to-neighbour``: share sent to a neighbour's expert;
        ``minority-to-owner``: among samples whose label is not this client's
        dominant class, the share sent to an owner of their label;
        ``dominant-sent-away``: among dominant-class samples, the share sent
        away. A share over an empty set is left out.
    """
    top1, labels = top1.cpu().long(), labels.cpu().long()
    dominant = dominant_class(own, num_classes)
    is_owner = torch.zeros(labels.shape[0], dtype=torch.bool)
    for c, clients in owners.items():
        rows = labels == c
        if rows.any() and clients:
            is_owner[rows] = torch.isin(top1[rows], torch.tensor(list(clients)))
    minority, major = labels != dominant, labels == dominant
    out = {ROUTED_TO_NEIGHBOUR: float((top1 != own).float().mean())}
    if minority.any():
        out[MINORITY_TO_OWNER] = float(is_owner[minority].float().mean())
    if major.any():
        out[DOMINANT_SENT_AWAY] = float((top1[major] != own).float().mean())
    return out


def owner_routing(
    labels: Tensor, own: int, owners: Mapping[int, Sequence[int]], present: Sequence[bool] | Tensor | None = None
) -> Tensor:
    """``(N,)`` the class-owner oracle's expert per sample: this client's own
    expert if it owns the label, else the label's first owner among the
    ``present`` experts (default: all; own if no owner is present)."""
    out = torch.full_like(labels, own)
    for c, clients in owners.items():
        reachable = [j for j in clients if present is None or bool(present[j])]
        if reachable and own not in clients:
            out[labels == c] = reachable[0]
    return out


def oracle_predictions(probs: Tensor, labels: Tensor, own: int, owners: Mapping[int, Sequence[int]]) -> dict[str, Tensor]:
    """Predictions of the two oracle routings over a frozen bank.

    Parameters
    ----------
    probs : Tensor
        ``(N, n, C)`` class probabilities of every expert for every sample.
    labels : Tensor
        ``(N,)`` true classes (the oracles look at them to route).

    Returns
    -------
    dict
        ``"class-owner"`` and ``"best-expert"``: ``(N,)`` predicted classes.
    """
    rows = torch.arange(labels.shape[0], device=probs.device)
    present = (probs > 0).any(2).any(0).cpu()  # a missing expert answers all zeros (gate.bank_probs)
    owner = owner_routing(labels, own, owners, present).to(probs.device)
    best = probs[rows, :, labels].argmax(dim=1)  # the expert most confident on the true label
    return {"class-owner": probs[rows, owner].argmax(1), "best-expert": probs[rows, best].argmax(1)}
