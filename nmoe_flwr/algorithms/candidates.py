"""Which experts a client's gate may route to when the bank is too big to send whole.

In the paper every client receives every expert (N = 10). With hundreds of
clients that is O(N) experts per client and O(N^2) traffic per run, so with
``gate-candidates = k`` each client gets only ``k`` experts: its own and
``k - 1`` *class specialists*. This is our addition (issue 13), not the
paper's.

Why specialists: a client's own expert already knows the client's frequent
classes; what routing adds is a better expert for the classes the client
has few samples of (README, "Routing"). So the server fills a client's list
class by class, starting with the classes the client has least of, and for
each class draws one expert at random among the ``N // C`` experts whose
training data holds the largest share of that class. The draw spreads the
load over the specialists (no single expert is every client's candidate) and
is seeded per client, so a run is reproducible.

What the server reads: each expert's class support (training samples per
class, sent with the stage-2 reply). In the paper's setting every client
receives every expert's weights, whose output biases carry the same
information, so this reveals nothing the paper's protocol hides; it is not
protected by differential privacy.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping

import numpy as np


def class_specialists(support: Mapping[int, np.ndarray], pool: int) -> list[list[int]]:
    """Per class, the ``pool`` experts with the largest share of that class in their training data.

    Parameters
    ----------
    support : mapping
        ``{expert id: (C,) training samples per class}``.
    pool : int
        Specialists kept per class (at least 1).

    Returns
    -------
    list
        ``specialists[c]``: expert ids, most specialised first (ties by id).
    """
    ids = sorted(support)
    counts = np.stack([np.asarray(support[j], dtype=np.float64) for j in ids])
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1.0)
    pool = max(1, min(pool, len(ids)))
    # Stable sort on -share: equal shares keep expert-id order.
    return [[ids[r] for r in np.argsort(-share[:, c], kind="stable")[:pool]] for c in range(counts.shape[1])]


def choose_candidates(
    support: Mapping[int, np.ndarray], k: int, seed: int, experts: Collection[int] | None = None
) -> dict[int, list[int]]:
    """Every client's ``k`` candidate experts: its own, then one specialist per class.

    Parameters
    ----------
    support : mapping
        ``{client id: (C,) training samples per class}`` of every client
        (a client's id is its expert's id).
    k : int
        Candidates per client (own expert included); ``k`` at least the
        number of experts gives every client the whole bank.
    seed : int
        Seed of the per-client draws.
    experts : collection, optional
        The experts that exist (default: every client's); a client whose own
        expert is missing gets ``k`` others.

    Returns
    -------
    dict
        ``{client id: sorted candidate expert ids}``, ``min(k, #experts)``
        each. Classes are visited in order of the client's own support
        (fewest samples first, ties by class), round-robin until the list
        is full; a class whose specialists are all taken is skipped, and
        when every specialist is taken the rest is a seeded draw.
    """
    ids = sorted(support if experts is None else experts)
    if k >= len(ids):
        return {i: list(ids) for i in support}
    num_classes = len(np.asarray(next(iter(support.values()))))
    specialists = class_specialists({j: support[j] for j in ids}, max(1, len(ids) // num_classes))
    out: dict[int, list[int]] = {}
    for i in sorted(support):
        rng = random.Random(f"nmoe-candidates:{seed}:{i}")
        chosen = [i] if i in ids else []
        order = np.argsort(np.asarray(support[i], dtype=np.float64), kind="stable")
        while len(chosen) < k:
            grew = False
            for c in order:
                free = [j for j in specialists[c] if j not in chosen]
                if free and len(chosen) < k:
                    chosen.append(rng.choice(free))
                    grew = True
            if not grew:
                rest = [j for j in ids if j not in chosen]
                chosen += rng.sample(rest, k - len(chosen))
        out[i] = sorted(chosen)
    return out
