"""FedSC: federated spectral contrastive learning with shared correlation matrices."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from logging import INFO

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
from .nodes import round_nodes
from .validation import (
    array_problem,
    array_spec,
    cast_like,
    common_metrics,
    fedavg_reply_problem,
    metric_problem,
    screen,
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

    Both phases check every reply first (:mod:`nmoe_flwr.strategies.validation`):
    a matrix must be finite and ``(d, d)``, a weight positive and finite,
    trained weights must have the entries, shapes and dtypes that were sent.
    A bad reply is dropped for the round with a warning naming the node; it
    never reaches another node's ``R_ext`` nor the average.

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
    correlation_dim : int, optional
        ``d`` of the ``(d, d)`` matrices; ``None`` takes the most common
        square shape of the first round's replies.
    min_replies : int
        Fewest valid replies (each phase) a round goes on with; fewer fail
        the run with :class:`~nmoe_flwr.strategies.validation.RoundFailed`.
    node_wait : float
        Seconds a round waits for ``min_available_nodes`` (e.g. for a
        restarted SuperNode to rejoin) before it goes on with the connected
        nodes, if at least ``min_replies``, else fails with
        :class:`~nmoe_flwr.strategies.nodes.NodesLost` (Flower waits forever).
    sample_seed : int
        Seed of the per-round node sample when ``fraction_train`` < 1.
    node_order : mapping of int to int, optional
        Stable rank of each node id for that sample and for the order in
        which replies are summed, as in
        :class:`~nmoe_flwr.strategies.partial_fedavg.PartialFedAvg`.
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
        correlation_dim: int | None = None,
        min_replies: int = 1,
        node_wait: float = 600.0,
        sample_seed: int = 0,
        node_order: Mapping[int, int] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.node_wait, self.sample_seed = node_wait, sample_seed
        self.node_order = dict(node_order) if node_order else None
        self.connected: dict[int, list[int]] = {}  # round -> nodes connected when it was configured
        if stale_matrices not in ("reuse", "drop"):
            raise ValueError(f"stale_matrices must be 'reuse' or 'drop', got {stale_matrices!r}")
        self.alpha = alpha
        self.correlation_message_type = correlation_message_type
        self.train_message_type = train_message_type
        self.stale_matrices = stale_matrices
        self.timeout = timeout
        self.correlation_dim = correlation_dim
        self.min_replies = min_replies
        self._sent: dict | None = None  # spec of the weights sent this round
        self._out: list[Message] = []  # the messages of the current phase
        self.missing: dict[int, dict[int, str]] = {}  # round -> {node: why it was left out}
        self.sampled: dict[int, list[int]] = {}  # round -> nodes sampled for it
        self.matrices: dict[int, CorrelationEntry] = {}
        self.releases: dict[int, int] = {}  # node -> matrices sent (for privacy accounting)

    def summary(self) -> None:
        """Log FedSC's settings, then FedAvg's summary."""
        log(INFO, "\t├──> FedSC: stale matrices %s, alpha(1) = %.3f", self.stale_matrices, self.alpha(1))
        super().summary()

    def correlation_problem(self, reply: Message) -> str | None:
        """Why a correlation reply breaks the contract (matrix ``(d, d)`` and finite, weight > 0), or ``None``."""
        if CORRELATION not in reply.content.array_records:
            return f"no ArrayRecord {CORRELATION!r}"
        record = reply.content.array_records[CORRELATION]
        if CORRELATION_KEY not in record:
            return f"no entry {CORRELATION_KEY!r} in {CORRELATION!r}"
        d = self.correlation_dim
        expected = {CORRELATION_KEY: ((d, d), str(record[CORRELATION_KEY].dtype))}
        if METRICS not in reply.content.metric_records:
            return f"no MetricRecord {METRICS!r}"
        return (array_problem(ArrayRecord({CORRELATION_KEY: record[CORRELATION_KEY]}), expected)
                or metric_problem(reply.content.metric_records[METRICS], (), NUM_EXAMPLES))

    def _settle_dim(self, replies: list[Message]) -> None:
        """Fix ``d`` from the most common square matrix shape, if not given."""
        if self.correlation_dim is not None:
            return
        shapes = [
            tuple(r.content[CORRELATION][CORRELATION_KEY].shape) for r in replies
            if not r.has_error() and CORRELATION in r.content.array_records
            and CORRELATION_KEY in r.content[CORRELATION]
        ]
        square = [s[0] for s in shapes if len(s) == 2 and s[0] == s[1] and s[0] > 0]
        if square:
            self.correlation_dim = Counter(square).most_common(1)[0][0]

    def collect_matrices(self, server_round: int, replies: Iterable[Message]) -> None:
        """Store the valid matrices of the correlation phase (and apply the stale policy)."""
        replies = list(replies)
        self._settle_dim(replies)
        self.missing[server_round] = {}
        valid = screen(replies, self.correlation_problem, what=self.correlation_message_type,
                       server_round=server_round, min_replies=self.min_replies,
                       sent=self._out, dropped=self.missing[server_round], order=self.node_order)
        fresh = {}
        for reply in valid:
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
        """FedAvg of the valid replies' weights, in ``node_order`` (reproducible float sums)."""
        if self._sent is None:
            raise RuntimeError("aggregate_train before configure_train: nothing was sent to check the replies against")
        valid = screen(replies, self.train_problem, what=self.train_message_type, server_round=server_round,
                       min_replies=self.min_replies, sent=self._out,
                       dropped=self.missing.setdefault(server_round, {}), order=self.node_order)
        common_metrics(valid)
        arrays, metrics = super().aggregate_train(server_round, valid)
        # The int64 BatchNorm counters come back from the average as float64: keep the sent dtypes.
        return (cast_like(arrays, self._sent) if arrays is not None else None), metrics

    def train_problem(self, reply: Message) -> str | None:
        """Why a training reply breaks the contract (FedAvg's: the sent entries back, a weight), or ``None``."""
        return fedavg_reply_problem(reply, self.arrayrecord_key, self._sent or {}, self.weighted_by_key)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes, run the correlation phase, then build per-node training messages."""
        sampled, self.connected[server_round] = round_nodes(self, grid, server_round,
                                                            f"{self.train_message_type} round {server_round}")
        self.sampled[server_round] = sampled
        config["server-round"] = server_round  # as FedAvg.configure_train
        self._sent = array_spec(arrays)
        config[ALPHA] = float(self.alpha(server_round))
        queries = [
            Message(
                RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config}),
                dst_node_id=node, message_type=self.correlation_message_type,
            )
            for node in sampled
        ]
        self._out = queries
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
        self._out = messages
        return messages
