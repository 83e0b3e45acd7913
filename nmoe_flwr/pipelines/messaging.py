"""The server's side of talking to the clients: one message per node, replies checked."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result
from flwr.supercore import log

from ..config import RunConfig
from ..constants import (
    ARRAYS,
    CONFIG,
    IN_CHANNELS,
    METRICS,
    MSG_INFO,
    NUM_CLASSES,
    NUM_ROUNDS,
    PARTITION_ID,
    ROUND_OFFSET,
)
from ..records import from_record, pack, to_record, unpack
from ..strategies import PartialFedAvg, split_shared
from ..strategies.nodes import wait_for_nodes
from ..strategies.validation import origin
from .resume import StageCheckpoint


class ClientFailure(RuntimeError):
    """A client replied with an error or not at all; the run cannot go on."""


def send_to_all(
    grid: Grid,
    contents: Mapping[int, RecordDict],
    message_type: str,
    timeout: float,
    missing: dict[int, str] | None = None,
) -> dict[int, RecordDict]:
    """Send one message per node and return ``{node id: reply content}``.

    With ``missing`` (a dict) a node that fails or does not answer in time is
    recorded there (``{node: reason}``, with a WARNING) and left out of the
    result; without it, any such node ends the run.

    Raises
    ------
    ClientFailure
        A node failed and ``missing`` is None, or no node answered.
    """
    messages = [Message(content, dst_node_id=node, message_type=message_type) for node, content in contents.items()]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    lost = {origin(r, to): f"error reply: {r.error.reason}" for r in replies if r.has_error()}
    answered = {origin(r, to) for r in replies}
    lost |= {node: "no reply within the round timeout" for node in contents if node not in answered}
    if lost and missing is None:
        raise ClientFailure(f"{message_type}: {len(replies) - len(lost)}/{len(messages)} replies; "
                            + "; ".join(f"node {n}: {why}" for n, why in lost.items()))
    ok = {r.metadata.src_node_id: r.content for r in replies if not r.has_error()}
    if not ok:
        raise ClientFailure(f"{message_type}: no node answered; " + "; ".join(f"node {n}: {why}" for n, why in lost.items()))
    for node, why in lost.items():
        log(WARNING, "%s: node %s left out: %s", message_type, node, why)
    if missing is not None:
        missing.update(lost)
    return ok


def weights_message(arrays: ArrayRecord) -> RecordDict:
    """Content of a message that carries model weights (packed, :func:`~nmoe_flwr.records.pack`:
    a few arrays instead of one per tensor) and an empty config."""
    return RecordDict({ARRAYS: to_record(pack(from_record(arrays))), CONFIG: ConfigRecord()})


def metrics_of(replies: Mapping[int, RecordDict]) -> dict[int, dict[str, float]]:
    """The MetricRecord of every reply, as plain dicts."""
    return {pid: dict(reply[METRICS]) for pid, reply in replies.items()}


def rounds_of(result: Result, num_rounds: int, what: str) -> dict[int, dict[str, float]]:
    """Aggregated training metrics per round of a finished ``Strategy.start``.

    Raises
    ------
    ClientFailure
        If fewer than ``num_rounds`` rounds were aggregated (replies missing).
    """
    if len(result.train_metrics_clientapp) != num_rounds:
        raise ClientFailure(f"{what}: only {len(result.train_metrics_clientapp)} of {num_rounds} rounds were aggregated")
    return {r: dict(m) for r, m in result.train_metrics_clientapp.items()}


@dataclass(frozen=True)
class Federation:
    """The connected clients of a run and how the server talks to them.

    Attributes
    ----------
    grid : Grid
    cfg : RunConfig
    pids : dict
        Node id -> partition id of every connected node.
    in_channels, num_classes : int
        What the clients' data looks like (reported by one node).
    """

    grid: Grid
    cfg: RunConfig
    pids: dict[int, int]
    in_channels: int
    num_classes: int

    @classmethod
    def discover(cls, grid: Grid, cfg: RunConfig, timeout: float = 300.0) -> Federation:
        """Wait for ``num-clients`` nodes and ask each for its partition id.

        The ServerApp cannot read a node's ``node_config``, so it asks every
        node (``query.info``); this also makes each client load and cache its
        data before training starts, so a missing data set fails first.

        Raises
        ------
        TimeoutError, ValueError
            Too few nodes after ``timeout`` s; too many; partition ids that
            are not ``0 .. num-clients - 1``.
        """
        deadline = time.monotonic() + timeout
        while len(nodes := list(grid.get_node_ids())) < cfg.num_clients:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(nodes)} of num-clients = {cfg.num_clients} nodes connected after {timeout:.0f} s")
            log(INFO, "Waiting for nodes: %d of %d connected", len(nodes), cfg.num_clients)
            time.sleep(1.0)
        if len(nodes) > cfg.num_clients:
            raise ValueError(f"{len(nodes)} nodes are connected but num-clients = {cfg.num_clients}; they must match")
        replies = send_to_all(grid, {n: RecordDict() for n in nodes}, MSG_INFO, cfg.round_timeout)
        pids = {node: int(rec[METRICS][PARTITION_ID]) for node, rec in replies.items()}
        if sorted(pids.values()) != list(range(cfg.num_clients)):
            raise ValueError(f"partition ids of the nodes are {sorted(pids.values())}, expected 0..{cfg.num_clients - 1}")
        info = replies[nodes[0]][METRICS]
        return cls(grid, cfg, pids, int(info[IN_CHANNELS]), int(info[NUM_CLASSES]))

    def broadcast(
        self, content: RecordDict, message_type: str, missing: dict[int, str] | None = None
    ) -> dict[int, RecordDict]:
        """Send the same content to every node; replies keyed by partition id.

        With ``missing`` (a dict), partitions that fail or time out are
        recorded there by partition id and left out (else the run ends).
        """
        return self.send(dict.fromkeys(self.pids.values(), content), message_type, missing)

    def send(
        self, contents: Mapping[int, RecordDict], message_type: str, missing: dict[int, str] | None = None
    ) -> dict[int, RecordDict]:
        """Send ``{partition id: content}``, one message each; replies keyed by partition id.

        ``missing`` as in :meth:`broadcast`.
        """
        # A node that died may be restarting: give it the rejoin window; one that stays away gets an error reply.
        wait_for_nodes(self.grid, len(self.pids), self.cfg.rejoin_timeout, message_type, at_least=1)
        lost: dict[int, str] | None = {} if missing is not None else None
        nodes = {node: contents[pid] for node, pid in self.pids.items() if pid in contents}
        replies = send_to_all(self.grid, nodes, message_type, self.cfg.round_timeout, lost)
        if missing is not None and lost:
            missing.update({self.pids[node]: why for node, why in lost.items()})
        # In partition order, not arrival order: sums over clients (means, banks) then repeat to the bit.
        return dict(sorted((self.pids[node], reply) for node, reply in replies.items()))

    def absent(self, connected: Sequence[int] | None) -> dict[int, str]:
        """``{partition id: "not connected"}`` of the nodes missing from ``connected``."""
        if connected is None:
            return {}
        return {pid: "not connected when the round started" for node, pid in self.pids.items() if node not in connected}

    def broadcast_metrics(
        self, content: RecordDict, message_type: str, missing: dict[int, str] | None = None
    ) -> dict[int, dict[str, float]]:
        """:meth:`broadcast`, returning each partition's metrics."""
        return metrics_of(self.broadcast(content, message_type, missing))

    def partial_fedavg(
        self,
        initial: Mapping[str, torch.Tensor],
        prefixes: Sequence[str],
        message_type: str,
        num_rounds: int,
        checkpoint: StageCheckpoint | None = None,
        server_momentum: float = 0.0,
        fraction_train: float | None = None,
    ) -> tuple[ArrayRecord, dict[int, dict[str, float]], dict[int, dict[int, str]]]:
        """Run one federated stage with :class:`PartialFedAvg` over a ``fraction-train`` sample of the clients per round.

        A round is averaged from the clients whose replies are valid (the
        others are logged and recorded); it fails only if none is. With a
        ``checkpoint`` every aggregated round is saved to it, and with
        ``resume`` in the config the stage continues after the saved round
        (or returns the saved result if it had finished). ``server_momentum``
        > 0 makes it FedAvgM (its velocity is checkpointed too).
        ``fraction_train`` overrides the config's share of clients per round.

        Returns
        -------
        arrays, rounds, missing
            The final shared arrays, the aggregated training metrics per round
            (with ``"replies"``, the number of replies averaged) and, per
            round, ``{partition id: reason}`` of every client left out.
        """
        saved = checkpoint.load() if checkpoint is not None and self.cfg.resume else None
        offset = int(saved["round"]) if saved else 0
        rounds: dict[int, dict[str, float]] = dict(saved["rounds"]) if saved else {}
        missing: dict[int, dict[int, str]] = dict(saved["missing"]) if saved else {}
        state = {**initial, **saved["arrays"]} if saved else dict(initial)
        if offset:
            log(INFO, "%s: resuming after round %d of %d", message_type, offset, num_rounds)
        if offset >= num_rounds:
            return split_shared(to_record(state), prefixes)[0], rounds, missing  # finished before the crash
        # On the wire the weights travel packed (a few arrays, not one per tensor); checkpoints and the result are plain.
        arrays = to_record(pack(state))
        strategy = PartialFedAvg(
            prefixes,
            train_message_type=message_type,
            fraction_evaluate=0.0,  # evaluation is a separate, final message
            fraction_train=self.cfg.fraction_train if fraction_train is None else fraction_train,
            min_train_nodes=1,
            min_available_nodes=self.cfg.num_clients,
            node_wait=self.cfg.rejoin_timeout,
            sample_seed=self.cfg.seed,
            node_order=self.pids,
            server_momentum=server_momentum,
        )
        if saved and saved.get("velocity") is not None:
            strategy.velocity = {k: v.numpy() for k, v in saved["velocity"].items()}

        def after_round(server_round: int, current: ArrayRecord) -> None:
            """Flower's per-round hook (``evaluate_fn``): record the round, checkpoint it."""
            if server_round == 0:
                return
            r = offset + server_round
            lost = {self.pids.get(n, n): why for n, why in strategy.missing.get(server_round, {}).items()}
            lost |= self.absent(strategy.connected.get(server_round))
            averaged = len(strategy.sampled.get(server_round, ())) - len(strategy.missing.get(server_round, {}))
            rounds[r] = {**strategy.train_metrics.get(server_round, {}), "replies": averaged}
            if lost:
                missing[r] = lost
            if checkpoint is not None:
                velocity = None if strategy.velocity is None else {k: torch.from_numpy(v) for k, v in strategy.velocity.items()}
                checkpoint.save(round=r, arrays=unpack(from_record(current), state), rounds=rounds, missing=missing,
                                velocity=velocity)

        result = strategy.start(
            grid=self.grid,
            initial_arrays=arrays,
            num_rounds=num_rounds - offset,
            timeout=self.cfg.round_timeout,
            train_config=ConfigRecord({NUM_ROUNDS: num_rounds, ROUND_OFFSET: offset}),
            evaluate_fn=after_round,
        )
        rounds_of(result, num_rounds - offset, message_type)  # raises if a round was not aggregated
        return to_record(unpack(from_record(result.arrays), state)), rounds, missing
