"""Client capacity profiles and the simulated wall clock of a round.

A profile says how fast a client computes (relative to the machine the
simulation runs on), how many experts it can hold at once, and its link
(bandwidth, latency). Profiles are given as tiers in the run config::

    capacity-tiers = "jetson-nano:4,jetson-orin:4,laptop:2"

(tier name : number of clients, in partition-id order; the counts must add up
to ``num-clients``). The figures of the built-in tiers are assumptions for
simulation, not measurements of those devices.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CapacityProfile:
    """What one client can do.

    Attributes
    ----------
    speed : float
        Compute speed relative to the simulation host (0.25 = 4x slower).
    max_experts : int
        Experts it can hold (and train) at once.
    bandwidth_mbps : float
        Link bandwidth, both directions, in Mbit/s.
    latency_ms : float
        One-way latency per message.
    """

    speed: float
    max_experts: int
    bandwidth_mbps: float
    latency_ms: float

    def transfer_seconds(self, num_bytes: int) -> float:
        """Time to move ``num_bytes`` over this client's link, latency included."""
        return self.latency_ms / 1e3 + 8 * num_bytes / (self.bandwidth_mbps * 1e6)


TIERS: dict[str, CapacityProfile] = {
    "jetson-nano": CapacityProfile(speed=0.25, max_experts=2, bandwidth_mbps=20, latency_ms=40),
    "jetson-orin": CapacityProfile(speed=1.0, max_experts=4, bandwidth_mbps=100, latency_ms=15),
    "laptop": CapacityProfile(speed=2.0, max_experts=6, bandwidth_mbps=200, latency_ms=10),
}


def parse_tiers(spec: str, num_clients: int) -> list[CapacityProfile]:
    """Profiles of clients ``0 .. num_clients - 1`` from a tier spec.

    Raises
    ------
    ValueError
        Unknown tier, malformed entry, or counts that do not add up to
        ``num_clients`` (the message names the entry and the allowed tiers).
    """
    profiles: list[CapacityProfile] = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        name, sep, count = entry.partition(":")
        if name not in TIERS:
            raise ValueError(f"capacity-tiers: unknown tier {name!r} in {entry!r}; tiers: {', '.join(TIERS)}")
        if not sep or not count.strip().isdigit() or int(count) < 1:
            raise ValueError(f"capacity-tiers: {entry!r} must be '<tier>:<number of clients>', e.g. 'laptop:2'")
        profiles += [TIERS[name]] * int(count)
    if len(profiles) != num_clients:
        raise ValueError(
            f"capacity-tiers = {spec!r} describes {len(profiles)} clients but num-clients = {num_clients}"
        )
    return profiles


def round_seconds(
    profiles: dict[int, CapacityProfile],
    bytes_down: dict[int, int],
    bytes_up: dict[int, int],
    compute_seconds: dict[int, float],
) -> float:
    """Simulated wall time of a round: the slowest selected client's
    download + compute (host seconds / speed) + upload."""
    return max(
        p.transfer_seconds(bytes_down[c]) + compute_seconds[c] / p.speed + p.transfer_seconds(bytes_up[c])
        for c, p in profiles.items()
        if c in compute_seconds
    )
