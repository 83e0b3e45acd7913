"""Client–expert alignment: scores kept by the server and the assignment rules.

Following the federated-MoE alignment paper (``shared/papers``): each round
the server gives every selected client a subset of the ``E`` experts to
train, at most as many as the client can hold.

Scores (``n`` clients x ``E`` experts), updated after every round:

- **fitness** ``F[i, j]``, an EMA of client ``i``'s feedback on expert ``j``.
  For an assigned pair, with ``r_ij`` the share of client ``i``'s samples its
  router sends to ``j`` and ``g_ij = max(0, (l_before - l_after) / l_before)``
  the relative loss improvement on those samples,
  ``F[i, j] <- (1 - beta) F[i, j] + beta (r_ij + lambda g_ij)``;
  every other pair decays, ``F[i, j] <- gamma F[i, j]`` (no interaction).
- **usage** ``U[j]``, an EMA of the training load expert ``j`` received:
  ``U[j] <- delta U[j] + (1 - delta) load_j`` with ``load_j`` the share of
  all samples trained this round that were routed to ``j``.

Assignment rules (one interface, :func:`assign`):

- ``random``: ``c_i`` experts uniformly at random;
- ``greedy``: the ``c_i`` experts of highest fitness;
- ``load-balanced`` (the paper's rule): desirability
  ``D[i, j] = w_f F[i, j] - w_u U[j]``, the ``c_i`` top-ranked;
- ``optimal`` (ours): one assignment for the whole round maximising
  ``sum D[i, j] x_ij`` subject to ``sum_j x_ij = c_i`` (capacity) and
  ``sum_i x_ij <= L`` (per-expert load cap), ``x`` binary -- solved exactly
  with SciPy's HiGHS MILP solver, so that clients do not pile onto the same
  expert when a better global split exists.

Ties are broken by a seeded random jitter far below any real score gap.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

RULES = ("random", "greedy", "load-balanced", "optimal")


@dataclass
class AlignmentScores:
    """Fitness and usage scores with their update rules (see module docstring)."""

    num_clients: int
    num_experts: int
    beta: float = 0.5  # fitness EMA step
    gamma: float = 0.9  # fitness decay without interaction
    improvement_weight: float = 1.0  # lambda
    delta: float = 0.7  # usage EMA decay
    fitness: np.ndarray = field(init=False)
    usage: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.fitness = np.zeros((self.num_clients, self.num_experts))
        self.usage = np.zeros(self.num_experts)

    def update(
        self,
        assigned: Mapping[int, Sequence[int]],
        routing_share: Mapping[int, np.ndarray],
        improvement: Mapping[int, Mapping[int, float]],
        load: np.ndarray,
    ) -> None:
        """Apply one round's feedback.

        Parameters
        ----------
        assigned : client -> experts it trained this round
        routing_share : client -> ``(E,)`` share of its samples routed to each expert
        improvement : client -> {expert: relative loss improvement}
        load : ``(E,)`` samples routed to each expert in training this round
        """
        trained = np.zeros_like(self.fitness, dtype=bool)
        feedback = np.zeros_like(self.fitness)
        for i, experts in assigned.items():
            for j in experts:
                trained[i, j] = True
                gain = max(0.0, float(improvement.get(i, {}).get(j, 0.0)))
                feedback[i, j] = float(routing_share[i][j]) + self.improvement_weight * gain
        self.fitness = np.where(trained, (1 - self.beta) * self.fitness + self.beta * feedback, self.gamma * self.fitness)
        total = float(np.sum(load))
        share = load / total if total > 0 else np.zeros_like(self.usage)
        self.usage = self.delta * self.usage + (1 - self.delta) * share


def load_cap(capacities: Sequence[int], num_experts: int, slack: float = 1.0) -> int:
    """Per-expert load cap ``L = ceil(slack * sum c_i / E)`` (always feasible for slack >= 1)."""
    return max(1, math.ceil(slack * sum(capacities) / num_experts))


def assign(
    rule: str,
    clients: Sequence[int],
    capacities: Mapping[int, int],
    scores: AlignmentScores,
    rng: np.random.Generator,
    *,
    fitness_weight: float = 1.0,
    usage_weight: float = 1.0,
    cap_slack: float = 1.0,
) -> dict[int, list[int]]:
    """Experts each selected client trains this round (``min(c_i, E)`` of them).

    Parameters
    ----------
    rule : one of :data:`RULES`
    clients : selected client indices (rows of the score matrices)
    capacities : client -> how many experts it can hold
    rng : seeded generator (random rule and tie-breaking)
    """
    if rule not in RULES:
        raise ValueError(f"assignment must be one of {RULES}, got {rule!r}")
    num_experts = scores.num_experts
    jitter = rng.random((len(clients), num_experts)) * 1e-9
    rows = np.array(clients, dtype=int)
    caps = [min(int(capacities[c]), num_experts) for c in clients]
    if rule == "random":
        return {c: sorted(rng.choice(num_experts, size=k, replace=False).tolist()) for c, k in zip(clients, caps)}
    if rule == "greedy":
        value = scores.fitness[rows] + jitter
    else:
        value = fitness_weight * scores.fitness[rows] - usage_weight * scores.usage[None, :] + jitter
    if rule in ("greedy", "load-balanced"):
        return {c: sorted(np.argsort(-value[r])[:k].tolist()) for r, (c, k) in enumerate(zip(clients, caps))}
    return _optimal(clients, caps, value, load_cap(caps, num_experts, cap_slack))


def _optimal(clients: Sequence[int], caps: Sequence[int], value: np.ndarray, cap: int) -> dict[int, list[int]]:
    """Maximise total desirability under client capacities and a per-expert load cap (MILP, HiGHS)."""
    from scipy import sparse
    from scipy.optimize import Bounds, LinearConstraint, milp

    n, e = value.shape
    # Sparse: x is (n, e) flattened; dense constraint rows would cost n * (n + e) * e floats (16 M at 1000 clients).
    rows_c = sparse.kron(sparse.identity(n), np.ones((1, e)), format="csr")  # client i holds caps[i] experts
    rows_e = sparse.kron(np.ones((1, n)), sparse.identity(e), format="csr")  # expert j is held at most cap times
    result = milp(
        c=-value.ravel(),
        constraints=[LinearConstraint(rows_c, caps, caps), LinearConstraint(rows_e, 0, cap)],
        integrality=np.ones(n * e),
        bounds=Bounds(0, 1),
    )
    if not result.success:
        raise RuntimeError(f"optimal assignment failed: {result.message}")
    x = np.round(result.x).reshape(n, e).astype(bool)
    return {c: np.flatnonzero(x[i]).tolist() for i, c in enumerate(clients)}


def load_cv(loads: np.ndarray) -> float:
    """Coefficient of variation (std / mean) of expert training loads; 0 = perfectly balanced."""
    mean = float(np.mean(loads))
    return float(np.std(loads) / mean) if mean > 0 else 0.0


def rounds_to_target(accuracy_by_round: Mapping[int, float], target: float) -> int | None:
    """First round whose global accuracy reaches ``target`` (None if never)."""
    for rnd in sorted(accuracy_by_round):
        if accuracy_by_round[rnd] >= target:
            return rnd
    return None
