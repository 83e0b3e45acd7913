"""FedAvg over a named subset of parameters (FedGate, FedCE with a local head)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from logging import INFO, WARNING

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from ..algorithms.server_momentum import momentum_step
from ..constants import SHARED_PREFIXES
from .nodes import round_nodes
from .validation import (
    array_spec,
    cast_like,
    common_metrics,
    fedavg_reply_problem,
    screen,
)


def split_shared(arrays: ArrayRecord, prefixes: Sequence[str]) -> tuple[ArrayRecord, list[str]]:
    """Keep the entries whose names start with one of ``prefixes``.

    Returns
    -------
    shared : ArrayRecord
        The shared entries, in their original order.
    dropped : list of str
        Names of the entries that were left out.
    """
    shared = ArrayRecord({k: v for k, v in arrays.items() if k.startswith(tuple(prefixes))})
    return shared, [k for k in arrays if not k.startswith(tuple(prefixes))]


class PartialFedAvg(FedAvg):
    """FedAvg of the parameters whose names start with ``shared_prefixes``.

    Everything else is *local*: it is never sent to the clients, never
    averaged, and a reply that carries it anyway has it dropped (with a
    warning) before aggregation. With ``shared_prefixes=("shared.",)`` this
    is the NMoE paper's FedGate (shallow gate layers averaged, decision layer
    local, Sec. III-C); with ``()`` every client trains alone; with a prefix
    that covers the whole model it is plain FedAvg.

    Client contract
    ---------------
    Receives, under ``arrayrecord_key``, an ArrayRecord holding only the
    shared entries, and a ConfigRecord with ``"server-round"`` and
    ``"shared-prefixes"`` (list of str). It loads the shared entries over
    its own model (keeping its local entries), trains, and replies with one
    ArrayRecord holding exactly the shared entries and one MetricRecord with
    ``"num-examples"`` (the weight of its update).

    Replies are checked before averaging
    (:mod:`nmoe_flwr.strategies.validation`): the shared entries with the
    shapes and dtypes that were sent, finite values, a positive finite
    ``"num-examples"``. Local entries in a reply are dropped with a warning;
    any other bad reply is dropped for the round with a warning naming the
    node and the reason (and kept in ``missing``: round -> node -> reason,
    with nodes that did not answer in time). The strategy's result (``Result.arrays``) holds the
    shared entries only: the local ones never leave the clients.

    Parameters
    ----------
    shared_prefixes : sequence of str
        Parameter-name prefixes that are averaged.
    train_message_type : str
        Message type of the training messages, e.g. ``"train.gate"`` to reach
        a ClientApp handler registered with ``@app.train("gate")``.
    min_replies : int
        Fewest valid replies a round is averaged from; fewer fail the run
        with :class:`~nmoe_flwr.strategies.validation.RoundFailed`.
    node_wait : float
        Seconds a round waits for ``min_available_nodes`` (e.g. for a
        restarted SuperNode to rejoin) before it goes on with the connected
        nodes, if at least ``min_replies``, else fails with
        :class:`~nmoe_flwr.strategies.nodes.NodesLost` (Flower waits forever).
    sample_seed : int
        Seed of the per-round node sample when ``fraction_train`` < 1
        (:func:`~nmoe_flwr.strategies.nodes.sample_nodes`; Flower's is unseeded).
    node_order : mapping of int to int, optional
        A stable rank of each node id (e.g. its partition id), so the seeded
        sample picks the same clients in every run (node ids are random per
        run) and replies are averaged in the same order (the same float sums).
        Default: node ids.
    server_momentum : float
        FedAvgM momentum on the shared weights
        (:func:`nmoe_flwr.algorithms.server_momentum.momentum_step`); 0 is FedAvg.
        Set ``velocity`` (a dict) to continue an earlier run's.
    **kwargs
        Passed on to :class:`flwr.serverapp.strategy.FedAvg`.
    """

    def __init__(
        self,
        shared_prefixes: Sequence[str],
        *,
        train_message_type: str = MessageType.TRAIN,
        min_replies: int = 1,
        node_wait: float = 600.0,
        server_momentum: float = 0.0,
        sample_seed: int = 0,
        node_order: Mapping[int, int] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.node_wait = node_wait
        self.sample_seed = sample_seed
        self.node_order = dict(node_order) if node_order else None
        self.connected: dict[int, list[int]] = {}  # round -> nodes connected when it was configured
        self.sampled: dict[int, list[int]] = {}  # round -> nodes sent the round's training message
        self.server_momentum = server_momentum
        # FedAvgM velocity: None until the first round is averaged (that round is plain FedAvg).
        self.velocity: dict | None = None
        self._prev: dict = {}  # the shared entries sent this round (numpy)
        self.shared_prefixes = tuple(shared_prefixes)
        self.train_message_type = train_message_type
        self.min_replies = min_replies
        self._sent: dict | None = None  # spec of the shared entries sent this round
        self._out: list[Message] = []  # the training messages of this round
        self.missing: dict[int, dict[int, str]] = {}  # round -> {node: why its reply was not used}
        self.train_metrics: dict[int, dict] = {}  # round -> aggregated training metrics

    def summary(self) -> None:
        """Log the shared prefixes, then FedAvg's summary."""
        log(INFO, "\t├──> Shared prefixes: %s (everything else stays local)", list(self.shared_prefixes))
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send only the shared entries, and the prefixes, to the sampled nodes."""
        sampled, self.connected[server_round] = round_nodes(self, grid, server_round,
                                                            f"{self.train_message_type} round {server_round}")
        self.sampled[server_round] = sampled
        shared, local = split_shared(arrays, self.shared_prefixes)
        if self._sent is None and local:
            log(INFO, "PartialFedAvg: %d local entries (%s...) stay on the clients and are not in the result",
                len(local), local[:3])
        self._sent = array_spec(shared)
        if self.server_momentum > 0:
            self._prev = {k: v.numpy() for k, v in shared.items()}
        config[SHARED_PREFIXES] = list(self.shared_prefixes)
        config["server-round"] = server_round  # as FedAvg.configure_train
        content = RecordDict({self.arrayrecord_key: shared, self.configrecord_key: config})
        self._out = [Message(content, dst_node_id=node, message_type=self.train_message_type) for node in sampled]
        return self._out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop local entries from the replies, drop invalid replies, then average by example count."""
        if self._sent is None:
            raise RuntimeError("aggregate_train before configure_train: nothing was sent to check the replies against")
        replies = list(replies)
        for reply in replies:
            if reply.has_error():
                continue
            for key, record in list(reply.content.array_records.items()):
                shared, dropped = split_shared(record, self.shared_prefixes)
                if dropped:
                    log(
                        WARNING,
                        "Node %s sent local entries %s; they were dropped, not averaged.",
                        reply.metadata.src_node_id,
                        dropped[:5],
                    )
                    reply.content[key] = shared
        self.missing[server_round] = {}
        valid = screen(replies, self.reply_problem, what=self.train_message_type, server_round=server_round,
                       min_replies=self.min_replies, sent=self._out, dropped=self.missing[server_round], order=self.node_order)
        common_metrics(valid)
        # Sorted by node_order's rank (screen): the float sums depend on neither arrival order nor node ids.
        arrays, metrics = super().aggregate_train(server_round, valid)
        if metrics is not None:
            self.train_metrics[server_round] = dict(metrics)
        if arrays is None:
            return None, metrics
        # The int64 BatchNorm counters come back from the average as float64: keep the sent dtypes.
        arrays = cast_like(arrays, self._sent)
        if self.server_momentum > 0:
            if self.velocity is None:
                self.velocity = {}  # the first round stays plain FedAvg
            else:
                avg = {k: v.numpy() for k, v in arrays.items()}
                new = momentum_step(self._prev, avg, self.velocity, self.server_momentum)
                arrays = ArrayRecord({k: Array(np.asarray(v, dtype=avg[k].dtype)) for k, v in new.items()})
        return arrays, metrics

    def reply_problem(self, reply: Message) -> str | None:
        """Why a training reply breaks the client contract, or ``None``."""
        return fedavg_reply_problem(reply, self.arrayrecord_key, self._sent or {}, self.weighted_by_key)
