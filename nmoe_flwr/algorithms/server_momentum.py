"""Server momentum for FedAvg (FedAvgM; Hsu, Qi and Brown, 2019, arXiv:1909.06335).

``v <- beta * v + (avg - prev)``, ``new = prev + v``: the server treats the
round's average update as a pseudo-gradient and accelerates along the
directions that persist across rounds. Ours for FedCE (``fedce-server-momentum``):
with 8 local steps per round the averaged update is small and consistent, and
momentum lets 50 rounds go further (chosen on held-out pooled probes, README).

The first round's update (from the random initialisation, atypically
large) is not carried into the velocity: callers start with ``velocity =
None`` (plain FedAvg that round) and pass ``{}`` from the second round on.

Applied to floating-point weights only: BatchNorm running statistics are
averages of data statistics, not weights (extrapolating them can make a
variance negative), and integer counters are not averaged at all. Works on
torch tensors and numpy arrays alike, so the Flower strategy and the plain
reference path (no Flower) share it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def takes_momentum(name: str, value: Any) -> bool:
    """Whether entry ``name`` is a weight momentum applies to (float, not a BatchNorm statistic)."""
    kind = getattr(getattr(value, "dtype", None), "is_floating_point", None)
    floating = kind if isinstance(kind, bool) else getattr(getattr(value, "dtype", None), "kind", "") == "f"
    return floating and "running_" not in name


def momentum_step(
    prev: Mapping[str, Any], avg: Mapping[str, Any], velocity: dict[str, Any], beta: float
) -> dict[str, Any]:
    """One FedAvgM server step; updates ``velocity`` in place and returns the new global state.

    Parameters
    ----------
    prev : the global state sent this round
    avg : the clients' weighted average
    velocity : ``{name: v}`` from the previous round (empty at the start)
    beta : momentum, ``0 <= beta < 1``; 0 returns ``avg``

    Entries that take no momentum (:func:`takes_momentum`) are ``avg``'s.
    """
    if beta <= 0:
        return dict(avg)
    out = {}
    for name, value in avg.items():
        if not takes_momentum(name, value):
            out[name] = value
            continue
        step = value - prev[name]
        velocity[name] = step if name not in velocity else beta * velocity[name] + step
        out[name] = prev[name] + velocity[name]
    return out
