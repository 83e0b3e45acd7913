"""A bounded wait for nodes, before Flower's unbounded one.

``FedAvg.configure_train`` samples through ``sample_nodes``, which waits for
``min_available_nodes`` forever ("Waiting for nodes to connect ..."): a
SuperNode that died keeps a deployment waiting until something outside kills
it. The strategies of this package call :func:`wait_for_nodes` first, so the
run fails after ``timeout`` seconds with a message instead.
"""

from __future__ import annotations

import time
from logging import INFO

from flwr.serverapp import Grid
from flwr.supercore import log


class NodesLost(RuntimeError):
    """Fewer nodes than a round needs stayed connected for longer than the wait allows."""


def wait_for_nodes(grid: Grid, minimum: int, timeout: float, what: str, poll: float = 1.0) -> list[int]:
    """The connected node ids once at least ``minimum`` are connected.

    Raises
    ------
    NodesLost
        Still fewer than ``minimum`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < minimum:
        if time.monotonic() >= deadline:
            raise NodesLost(f"{what}: only {len(nodes)} of the {minimum} nodes needed are connected "
                            f"after {timeout:g} s (nodes {sorted(nodes)})")
        log(INFO, "%s: waiting for nodes: %d connected (minimum %d)", what, len(nodes), minimum)
        time.sleep(poll)
    return nodes
