"""The nodes of a round: a bounded wait, then a seeded sample of those connected.

``FedAvg.configure_train`` samples through Flower's ``sample_nodes``, which
waits for ``min_available_nodes`` forever ("Waiting for nodes to connect
...") and draws from the global ``random``. On a deployment, a SuperNode
that died then keeps the run waiting until something outside kills it.
The strategies of this package call :func:`round_nodes` instead: a round
waits at most ``node_wait`` seconds for the nodes it wants (long enough for
a restarted SuperNode to rejoin), then goes on with those connected if they
are at least ``min_replies``, and fails with :class:`NodesLost` otherwise.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from logging import INFO, WARNING

from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log


class NodesLost(RuntimeError):
    """Fewer nodes than a round can go on with stayed connected for longer than the wait allows."""


def wait_for_nodes(
    grid: Grid, wanted: int, timeout: float, what: str, at_least: int | None = None, poll: float = 1.0
) -> list[int]:
    """The connected node ids, once ``wanted`` are connected or ``timeout`` s have passed.

    Parameters
    ----------
    wanted : int
        Nodes to wait for.
    timeout : float
        Longest wait, in seconds.
    at_least : int, optional
        Fewest nodes to go on with after ``timeout`` (with a WARNING); by
        default ``wanted``.

    Raises
    ------
    NodesLost
        Fewer than ``at_least`` connected after ``timeout`` seconds.
    """
    at_least = wanted if at_least is None else at_least
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < wanted:
        if time.monotonic() >= deadline:
            if len(nodes) >= at_least:
                log(WARNING, "%s: going on with the %d connected nodes of the %d wanted after waiting %g s (nodes %s)",
                    what, len(nodes), wanted, timeout, sorted(nodes))
                return nodes
            raise NodesLost(f"{what}: only {len(nodes)} of the {at_least} nodes needed are connected "
                            f"after {timeout:g} s (nodes {sorted(nodes)})")
        log(INFO, "%s: waiting for nodes: %d connected (wanted %d)", what, len(nodes), wanted)
        time.sleep(poll)
    return nodes


def rank_key(order: Mapping[int, int] | None) -> Callable[[int], tuple[int, int, int]]:
    """Sort key of node ids by their stable rank in ``order`` (e.g. partition id); nodes
    without one come after the ranked ones, by id (all of them, when ``order`` is ``None``)."""
    return lambda n: (0, order[n], n) if order and n in order else (1, 0, n)


def sample_nodes(
    connected: list[int], fraction: float, min_nodes: int, seed: int, server_round: int,
    order: Mapping[int, int] | None = None,
) -> list[int]:
    """FedAvg's sample size (``max(int(n * fraction), min_nodes)``, at most ``n``), drawn reproducibly.

    The draw depends only on the nodes, ``seed`` and ``server_round``
    (Flower's ``sample_nodes`` uses the unseeded global ``random``). Node ids
    are random per Flower run, so a caller that knows a stable rank of each
    node (e.g. its partition id) passes it as ``order``: the draw is then over
    ranks, and two runs with the same seed sample the same clients. Nodes
    without a rank come after the ranked ones, by id. Sorted by node id.
    """
    size = min(len(connected), max(int(len(connected) * fraction), min_nodes))
    if size >= len(connected):
        return sorted(connected)
    ranked = sorted(connected, key=rank_key(order))
    return sorted(random.Random(f"nmoe-sample:{seed}:{server_round}").sample(ranked, size))


def round_nodes(
    strategy: FedAvg, grid: Grid, server_round: int, what: str, evaluate: bool = False
) -> tuple[list[int], list[int]]:
    """``(sampled, connected)`` for one training (or, with ``evaluate``, evaluation) round of ``strategy``.

    Reads the strategy's ``min_available_nodes`` (nodes wanted),
    ``node_wait`` (longest wait), ``min_replies`` (fewest to go on with),
    ``fraction_train``/``min_train_nodes`` (or ``fraction_evaluate``/
    ``min_evaluate_nodes``: sample size), ``sample_seed`` and ``node_order``
    (stable node ranks or ``None``, see :func:`sample_nodes`); evaluation
    rounds draw their own sample.
    """
    connected = wait_for_nodes(grid, strategy.min_available_nodes, strategy.node_wait, what,
                               at_least=strategy.min_replies)
    if evaluate:
        fraction, minimum, draw = strategy.fraction_evaluate, strategy.min_evaluate_nodes, -server_round
    else:
        fraction, minimum, draw = strategy.fraction_train, strategy.min_train_nodes, server_round
    sampled = sample_nodes(connected, fraction, minimum, strategy.sample_seed, draw, strategy.node_order)
    log(INFO, "%s: sampled %d nodes (out of %d connected)", what, len(sampled), len(connected))
    return sampled, sorted(connected)
