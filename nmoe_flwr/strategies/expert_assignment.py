"""Capacity-aware federated training of a global MoE with client–expert assignment."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from ..algorithms.alignment import AlignmentScores, assign
from ..capacity import CapacityProfile, round_seconds
from ..constants import (
    ASSIGNED_EXPERTS,
    BYTES,
    EXPERT_IMPROVEMENT,
    EXPERT_ROUTED,
    METRICS,
    MOE_GATE_PREFIX,
    NUM_EXAMPLES,
    ROUTING_SHARE,
    SECONDS,
    SIM_SECONDS,
    TRAIN_LOSS,
    moe_expert_prefix,
)
from .nodes import round_nodes
from .validation import (
    array_problem,
    array_spec,
    common_metrics,
    metric_problem,
    screen,
    single_records,
)


def record_bytes(record: ArrayRecord) -> int:
    """Payload bytes of an ArrayRecord (what travels for its arrays)."""
    return sum(len(a.data) for a in record.values())


def aggregate_experts(
    current: Mapping[str, np.ndarray],
    updates: Sequence[tuple[Mapping[str, np.ndarray], Mapping[int, float], float]],
    num_experts: int,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Aggregate one round of a global MoE.

    Parameters
    ----------
    current : the global state before the round (numpy arrays by name)
    updates : per client ``(its returned entries, {expert: samples routed to it}, num-examples)``;
        a client returns the gate and only the experts it trained
    num_experts : E

    Returns
    -------
    state, load
        The new global state -- the gate averaged over all clients by
        ``num-examples``; each expert averaged over the clients that trained
        it, weighted by the samples routed to it (equal weights if none were);
        an expert nobody trained keeps its weights -- and ``(E,)`` samples
        routed to each expert this round.
    """
    new = {k: np.array(v, copy=True) for k, v in current.items()}
    gate_keys = [k for k in current if k.startswith(MOE_GATE_PREFIX)]
    total = sum(n for _, _, n in updates)
    if total > 0:
        for k in gate_keys:
            new[k] = sum(u[k] * (n / total) for u, _, n in updates).astype(current[k].dtype)
    load = np.zeros(num_experts)
    for j in range(num_experts):
        prefix = moe_expert_prefix(j)
        trainers = [(u, routed.get(j, 0.0)) for u, routed, _ in updates if any(k.startswith(prefix) for k in u)]
        if not trainers:
            continue
        weights = np.array([w for _, w in trainers], dtype=float)
        load[j] = weights.sum()
        weights = weights / weights.sum() if weights.sum() > 0 else np.full(len(trainers), 1 / len(trainers))
        for k in (k for k in current if k.startswith(prefix)):
            new[k] = sum(u[k] * w for (u, _), w in zip(trainers, weights)).astype(current[k].dtype)
    return new, load


@dataclass(frozen=True)
class RoundLog:
    """What the server records about one round of assignment."""

    server_round: int
    assignment: dict[int, list[int]]  # client index -> experts
    load: list[float]  # samples routed to each expert
    bytes_down: int
    bytes_up: int
    sim_seconds: float


class ExpertAssignment(FedAvg):
    """Each round, assign every sampled client a subset of the experts to train.

    Clients are rows of the score matrices; ``clients`` maps node ids to
    them and ``profiles`` gives each row's capacity. Per round:

    1. sample nodes (FedAvg), choose experts with the ``rule``
       (:func:`nmoe_flwr.alignment.assign`: random, greedy, load-balanced,
       optimal) under each client's ``max_experts``;
    2. send each node the gate and only its experts (entries ``gate.*``,
       ``experts.<j>.*``) and ``"assigned-experts"`` (list of int) in the
       config;
    3. aggregate with :func:`aggregate_experts`, update fitness and usage
       scores from the clients' feedback, and log bytes and the simulated
       round time (slowest client's download + compute / speed + upload).

    Client contract
    ---------------
    Train the gate and the assigned experts with routing restricted to them;
    reply with one ArrayRecord (``gate.*`` and the assigned experts' entries)
    and one MetricRecord with ``"num-examples"``, ``"train-loss"``,
    ``"seconds"`` (host compute time), ``"expert-routed"`` and
    ``"expert-improvement"`` (lists aligned with ``"assigned-experts"``) and
    ``"routing-share"`` (length-E list: share of its samples its unrestricted
    router sends to each expert).

    Replies are checked first (:mod:`nmoe_flwr.strategies.validation`):
    exactly the entries that were sent to that node (so no node can write an
    expert it was not assigned), with their shapes, finite values, every
    metric above with the right list lengths, a positive ``"num-examples"``.
    A bad reply is dropped for the round with a warning naming the node.

    Evaluation sends the full global model to a ``fraction_evaluate``
    sample of the nodes with ``evaluate_message_type``; the client scores it.
    """

    def __init__(
        self,
        *,
        rule: str,
        num_experts: int,
        clients: Mapping[int, int],
        profiles: Mapping[int, CapacityProfile],
        scores: AlignmentScores,
        seed: int,
        fitness_weight: float = 1.0,
        usage_weight: float = 1.0,
        cap_slack: float = 1.0,
        train_message_type: str = "train.moe",
        evaluate_message_type: str = "evaluate.moe",
        min_replies: int = 1,
        node_wait: float = 600.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        # Seconds a round waits for min_available_nodes (Flower: forever), then goes on with min_replies or more.
        self.node_wait = node_wait
        self.sample_seed = seed  # the node sample of a round (fraction_train < 1) is seeded too
        self.connected: dict[int, list[int]] = {}  # round -> nodes connected when it was configured
        self.rule, self.num_experts = rule, num_experts
        self.clients, self.profiles, self.scores = dict(clients), dict(profiles), scores
        self.node_order = self.clients  # the seeded node sample is over client rows, not the per-run node ids
        self.rng = np.random.default_rng(seed)
        self.fitness_weight, self.usage_weight, self.cap_slack = fitness_weight, usage_weight, cap_slack
        self.train_message_type, self.evaluate_message_type = train_message_type, evaluate_message_type
        self.history: list[RoundLog] = []
        self._global: ArrayRecord | None = None
        self._assigned: dict[int, list[int]] = {}
        self._bytes_down: dict[int, int] = {}
        self._sent: dict[int, dict] = {}  # node -> spec of the entries sent this round
        self._out: list[Message] = []  # the training messages of this round
        self.missing: dict[int, dict[int, str]] = {}  # round -> {node: why its reply was not used}
        self.min_replies = min_replies  # fewest valid replies a round goes on with (RoundFailed below)

    def summary(self) -> None:
        """Log the rule and the capacities, then FedAvg's summary."""
        caps = sorted(p.max_experts for p in self.profiles.values())
        log(INFO, "\t├──> Expert assignment: %s over %d experts, capacities %s", self.rule, self.num_experts, caps)
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes, assign experts, send each node the gate and its experts."""
        self._global = arrays
        nodes, self.connected[server_round] = round_nodes(self, grid, server_round,
                                                          f"{self.train_message_type} round {server_round}")
        config["server-round"] = server_round  # as FedAvg.configure_train
        rows = [self.clients[n] for n in nodes]
        caps = {self.clients[n]: self.profiles[self.clients[n]].max_experts for n in nodes}
        by_row = assign(
            self.rule, rows, caps, self.scores, self.rng,
            fitness_weight=self.fitness_weight, usage_weight=self.usage_weight, cap_slack=self.cap_slack,
        )
        self._assigned = {n: by_row[self.clients[n]] for n in nodes}
        self._sent = {}
        messages = []
        for node in nodes:
            prefixes = (MOE_GATE_PREFIX, *(moe_expert_prefix(j) for j in self._assigned[node]))
            subset = ArrayRecord({k: v for k, v in arrays.items() if k.startswith(prefixes)})
            self._bytes_down[node] = record_bytes(subset)
            self._sent[node] = array_spec(subset)
            cfg = ConfigRecord({**dict(config), ASSIGNED_EXPERTS: self._assigned[node]})
            content = RecordDict({self.arrayrecord_key: subset, self.configrecord_key: cfg})
            messages.append(Message(content, dst_node_id=node, message_type=self.train_message_type))
        self._out = messages
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Per-expert aggregation, score updates, bytes and simulated time."""
        if self._global is None:
            raise RuntimeError("aggregate_train before configure_train: nothing was sent to check the replies against")
        self.missing[server_round] = {}
        valid = screen(replies, self.reply_problem, what=self.train_message_type, server_round=server_round,
                       min_replies=self.min_replies, sent=self._out, dropped=self.missing[server_round], order=self.node_order)
        # screen returns them in client-row order (node_order): the float sums (and runs) are reproducible.
        current = {k: v.numpy() for k, v in self._global.items()}
        updates, assigned, shares, gains, seconds, bytes_up = [], {}, {}, {}, {}, {}
        for reply in valid:
            node = reply.metadata.src_node_id
            row = self.clients[node]
            metrics = reply.content[METRICS]
            experts = self._assigned[node]
            routed = dict(zip(experts, (float(v) for v in metrics[EXPERT_ROUTED])))
            record = reply.content[self.arrayrecord_key]
            updates.append(({k: v.numpy() for k, v in record.items()}, routed, float(metrics[NUM_EXAMPLES])))
            assigned[row] = experts
            shares[row] = np.asarray(metrics[ROUTING_SHARE], dtype=float)
            gains[row] = dict(zip(experts, (float(v) for v in metrics[EXPERT_IMPROVEMENT])))
            seconds[row] = float(metrics[SECONDS])
            bytes_up[row] = record_bytes(record)
        state, load = aggregate_experts(current, updates, self.num_experts)
        self.scores.update(assigned, shares, gains, load)
        down = {self.clients[n]: b for n, b in self._bytes_down.items() if self.clients[n] in seconds}
        sim = round_seconds(self.profiles, down, bytes_up, seconds)
        self.history.append(RoundLog(server_round, assigned, load.tolist(), sum(down.values()), sum(bytes_up.values()), sim))
        total = sum(u[2] for u in updates)
        loss = sum(float(r.content[METRICS][TRAIN_LOSS]) * u[2] for r, u in zip(valid, updates)) / total
        metrics = MetricRecord({
            TRAIN_LOSS: loss, BYTES: sum(down.values()) + sum(bytes_up.values()), SIM_SECONDS: sim,
        })
        return ArrayRecord({k: Array(v) for k, v in state.items()}), metrics

    def reply_problem(self, reply: Message) -> str | None:
        """Why a training reply breaks the client contract, or ``None``."""
        node = reply.metadata.src_node_id
        if node not in self._sent:
            return "not asked this round"
        arrays, metrics, problem = single_records(reply, self.arrayrecord_key)
        if problem or (problem := array_problem(arrays, self._sent[node])):
            return problem
        required = (TRAIN_LOSS, SECONDS, EXPERT_ROUTED, EXPERT_IMPROVEMENT, ROUTING_SHARE)
        if problem := metric_problem(metrics, required, NUM_EXAMPLES):
            return problem
        lengths = {EXPERT_ROUTED: len(self._assigned[node]), EXPERT_IMPROVEMENT: len(self._assigned[node]),
                   ROUTING_SHARE: self.num_experts}
        for key, n in lengths.items():
            value = metrics[key]
            if not isinstance(value, list) or len(value) != n:
                got = f"{len(value)} values" if isinstance(value, list) else repr(value)
                return f"metric {key!r} must be a list of {n} values, got {got}"
        return None

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """FedAvg's weighted mean of the evaluation metrics, over the valid replies."""
        valid = screen(replies, self.evaluate_problem, what=self.evaluate_message_type, server_round=server_round,
                       min_replies=self.min_replies, order=self.node_order)
        common_metrics(valid)
        return super().aggregate_evaluate(server_round, valid)

    def evaluate_problem(self, reply: Message) -> str | None:
        """Why an evaluation reply cannot be averaged (one MetricRecord, finite, ``num-examples`` > 0), or ``None``."""
        _, metrics, problem = single_records(reply, None)
        return problem or metric_problem(metrics, (), self.weighted_by_key)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The global model to a seeded ``fraction_evaluate`` sample of the connected nodes
        (a bounded wait, as for training), as ``evaluate_message_type``."""
        if self.fraction_evaluate == 0.0:
            return []
        nodes, _ = round_nodes(self, grid, server_round, f"{self.evaluate_message_type} round {server_round}",
                               evaluate=True)
        config["server-round"] = server_round  # as FedAvg.configure_evaluate
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return [Message(content, dst_node_id=node, message_type=self.evaluate_message_type) for node in nodes]
