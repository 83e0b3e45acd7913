"""Client partitions for the NMoE non-IID(tau) protocol.

In the NMoE paper every client holds samples of every class, but one
*dominant* class takes a share ``1 - tau`` of the client's data and the
remaining ``tau`` is spread evenly over the other classes.  Client ``k``'s
dominant class is ``k % num_classes``, so the dominant classes differ as long
as ``num_clients <= num_classes``.  Smaller ``tau`` is more skewed; with 10
classes ``tau = 0.9`` is the uniform (IID) case.  The ``"iid"`` scheme gives
every class the same count directly.
"""

from __future__ import annotations

import numpy as np

SCHEMES = ("iid", "dominant")


def class_counts(scheme: str, tau: float, per_client: int, num_classes: int, client: int) -> np.ndarray:
    """Number of samples of each class that ``client`` receives.

    Parameters
    ----------
    scheme : {"iid", "dominant"}
    tau : float
        Non-dominant share, in the open interval (0, 1); checked for both schemes.
    per_client : int
        Samples per client, >= 0.
    num_classes : int
        Number of classes (>= 1; >= 2 for ``"dominant"``).
    client : int
        Client index, >= 0.

    Returns
    -------
    numpy.ndarray
        ``int64`` array of length ``num_classes`` summing to ``per_client``.
        For ``"dominant"`` class ``client % num_classes`` gets
        ``round((1 - tau) * per_client)``.  Remainders go one each to classes
        following a client-dependent offset, so over ``num_classes`` clients every
        class is requested equally often (e.g. 10 clients x 1000 samples with
        tau = 0.1 need exactly 1000 samples per class).

    Raises
    ------
    ValueError
        Unknown scheme, tau outside (0, 1), or invalid sizes.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; allowed: {list(SCHEMES)}")
    if not 0.0 < tau < 1.0:
        raise ValueError(f"tau must be in (0, 1), got {tau!r}")
    if per_client < 0 or client < 0:
        raise ValueError(f"per_client and client must be >= 0, got {per_client} and {client}")
    min_classes = 2 if scheme == "dominant" else 1
    if num_classes < min_classes:
        raise ValueError(f"scheme {scheme!r} needs num_classes >= {min_classes}, got {num_classes}")

    c = num_classes
    counts = np.zeros(c, dtype=np.int64)
    if scheme == "iid":
        counts[:] = per_client // c
        for j in range(per_client % c):
            counts[(client + j) % c] += 1
        return counts

    d = client % c
    # float() first: round() of a numpy scalar tau may return a numpy float, not an int.
    n_dom = min(round(float((1.0 - tau) * per_client)), per_client)
    n_rest = per_client - n_dom
    counts[:] = n_rest // (c - 1)
    counts[d] = n_dom
    # Start the remainder right after the dominant class, which rotates with the
    # client, so the extra samples are spread over all classes.
    for j in range(n_rest % (c - 1)):
        counts[(d + 1 + j) % c] += 1
    return counts


def partition_indices(
    labels: np.ndarray, num_clients: int, per_client: int, scheme: str, tau: float, seed: int
) -> list[np.ndarray]:
    """Split sample indices into disjoint per-client sets.

    Parameters
    ----------
    labels : numpy.ndarray
        1-D non-negative integer labels; ``num_classes = labels.max() + 1``.
    num_clients, per_client : int
        Number of clients (>= 1) and samples per client.
    scheme, tau
        As for ``class_counts``.
    seed : int
        Seed of ``numpy.random.default_rng``; the same inputs and seed always
        give the same result.

    Returns
    -------
    list of numpy.ndarray
        ``num_clients`` pairwise disjoint ``int64`` index arrays; array ``k``
        holds exactly ``class_counts(scheme, tau, per_client, num_classes, k)``
        indices of each class, in shuffled order.

    Raises
    ------
    ValueError
        Invalid arguments, or a class with fewer samples than the clients need.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a non-empty 1-D integer array, got {labels.dtype} {labels.shape}")
    if labels.min() < 0:
        raise ValueError(f"labels must be >= 0, found {int(labels.min())}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    num_classes = int(labels.max()) + 1
    counts = np.stack([class_counts(scheme, tau, per_client, num_classes, k) for k in range(num_clients)])

    needed, available = counts.sum(axis=0), np.bincount(labels, minlength=num_classes)
    for cls in range(num_classes):
        if needed[cls] > available[cls]:
            raise ValueError(
                f"class {cls}: {num_clients} clients need {int(needed[cls])} samples but only "
                f"{int(available[cls])} are available; use a smaller train-per-client/"
                "test-per-client or fewer clients"
            )

    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for cls in range(num_classes):
        pool = rng.permutation(np.flatnonzero(labels == cls))
        bounds = np.concatenate([[0], np.cumsum(counts[:, cls])])
        for k in range(num_clients):
            parts[k].append(pool[bounds[k]:bounds[k + 1]])
    out = []
    for k in range(num_clients):
        idx = np.concatenate(parts[k]).astype(np.int64)
        rng.shuffle(idx)
        out.append(idx)
    return out
