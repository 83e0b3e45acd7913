"""FedSC: federated spectral contrastive learning with shared correlation matrices."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from ..constants import (
    ALPHA,
    CORRELATION,
    CORRELATION_KEY,
    METRICS,
    NUM_EXAMPLES,
    R_EXT_KEY,
)


@dataclass(frozen=True)
class CorrelationEntry:
    """A client's last (noised) correlation matrix, its weight and the round it was sent."""

    matrix: np.ndarray
    weight: float
    server_round: int


def external_correlation(entries: Mapping[int, CorrelationEntry], node: int) -> np.ndarray | None:
    """``R_ext`` for ``node``: the weighted mean of the *other* nodes' matrices.

    ``R_{-i} = sum_{j != i} q_j R_j / sum_{j != i} q_j`` with ``q_j`` the
    weight (data share) each client reported (NMoE paper, Eq. 3). ``None``
    when no other node has a matrix.
    """
    others = [e for n, e in entries.items() if n != node]
    if not others:
        return None
    total = sum(e.weight for e in others)
    return sum(e.matrix * (e.weight / total) for e in others)


class FedSC(FedAvg):
    """FedSC round: correlation matrices first, then training against them.

    Each round, for the sampled nodes:

    1. send the global weights with message type ``correlation_message_type``;
       each node replies with its (noised) correlation matrix ``R_i`` under
       those weights (ArrayRecord ``"correlation"``, entry ``"r"``) and its
       data size (MetricRecord ``"num-examples"``, the weight ``q_i``);
    2. send each node the global weights, the config (``"server-round"``,
       ``"alpha"``) and ``R_ext`` (ArrayRecord ``"correlation"``, entry
       ``"r-ext"``; empty when no other matrix exists) with message type
       ``train_message_type``; nodes train and reply like FedAvg clients;
    3. average the weights by ``num-examples`` (FedAvg).

    **BatchNorm is averaged** like every other entry: NMoE needs one extractor
    ``F`` shared by all clients (a latent computed on one device is scored
    by another device's expert), which per-client BN statistics (FedBN) would
    break.

    **Stale matrices** (partial participation): with ``stale_matrices =
    "reuse"`` a node that was not sampled this round keeps contributing its
    last matrix to the others' ``R_ext`` (its age is logged); with ``"drop"``
    only matrices sent this round are used.

    Parameters
    ----------
    alpha : callable
        ``server_round -> alpha``, the weight of the local term (the public
        code decays it linearly from 1 to 0.2).
    correlation_message_type, train_message_type : str
        Message types of the two phases (ClientApp handlers
        ``@app.query("correlation")`` and ``@app.train("fedsc")`` by default).
    stale_matrices : {"reuse", "drop"}
    timeout : float
        Seconds to wait for the correlation replies.
    **kwargs
        Passed on to :class:`flwr.serverapp.strategy.FedAvg`.
    """

    def __init__(
        self,
        *,
        alpha: Callable[[int], float] = lambda _round: 1.0,
        correlation_message_type: str = "query.correlation",
        train_message_type: str = "train.fedsc",
        stale_matrices: str = "reuse",
        timeout: float = 3600.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if stale_matrices not in ("reuse", "drop"):
            raise ValueError(f"stale_matrices must be 'reuse' or 'drop', got {stale_matrices!r}")
        self.alpha = alpha
        self.correlation_message_type = correlation_message_type
        self.train_message_type = train_message_type
        self.stale_matrices = stale_matrices
        self.timeout = timeout
        self.matrices: dict[int, CorrelationEntry] = {}
        self.releases: dict[int, int] = {}  # node -> matrices sent (for privacy accounting)

    def summary(self) -> None:
        """Log FedSC's settings, then FedAvg's summary."""
        log(INFO, "\t├──> FedSC: stale matrices %s, alpha(1) = %.3f", self.stale_matrices, self.alpha(1))
        super().summary()

    def collect_matrices(self, server_round: int, replies: Iterable[Message]) -> None:
        """Store the matrices of the correlation phase (and apply the stale policy)."""
        fresh = {}
        for reply in replies:
            if reply.has_error():
                log(WARNING, "Node %s sent no correlation matrix: %s", reply.metadata.src_node_id, reply.error.reason)
                continue
            node = reply.metadata.src_node_id
            matrix = reply.content[CORRELATION][CORRELATION_KEY].numpy()
            weight = float(reply.content[METRICS][NUM_EXAMPLES])
            fresh[node] = CorrelationEntry(matrix, weight, server_round)
            self.releases[node] = self.releases.get(node, 0) + 1
        if self.stale_matrices == "drop":
            self.matrices = fresh
        else:
            self.matrices.update(fresh)
            stale = {n: server_round - e.server_round for n, e in self.matrices.items() if n not in fresh}
            if stale:
                log(INFO, "FedSC: reusing stale matrices of %d nodes (ages %s rounds)", len(stale), sorted(stale.values()))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg of the weights, with replies in node order (reproducible float sums)."""
        return super().aggregate_train(server_round, sorted(replies, key=lambda r: r.metadata.src_node_id))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes, run the correlation phase, then build per-node training messages."""
        sampled = [m.metadata.dst_node_id for m in super().configure_train(server_round, arrays, config, grid)]
        config[ALPHA] = float(self.alpha(server_round))
        queries = [
            Message(
                RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config}),
                dst_node_id=node, message_type=self.correlation_message_type,
            )
            for node in sampled
        ]
        replies = list(grid.send_and_receive(queries, timeout=self.timeout))
        self.collect_matrices(server_round, replies)
        messages = []
        for node in sampled:
            if node not in self.matrices or self.matrices[node].server_round != server_round:
                continue  # it failed the correlation phase: leave it out of this round
            r_ext = external_correlation(self.matrices, node)
            ext = ArrayRecord({R_EXT_KEY: Array(np.ascontiguousarray(r_ext, dtype=np.float32))}) if r_ext is not None else ArrayRecord()
            content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config, CORRELATION: ext})
            messages.append(Message(content, dst_node_id=node, message_type=self.train_message_type))
        return messages
