"""Per-expert aggregation by hand and the ExpertAssignment strategy's messages."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from nmoe_flwr.algorithms.alignment import AlignmentScores
from nmoe_flwr.capacity import CapacityProfile
from nmoe_flwr.strategies import ExpertAssignment, aggregate_experts
from nmoe_flwr.strategies.expert_assignment import record_bytes


def _a(*values):
    return np.array(values, dtype=np.float32)


CURRENT = {"gate.w": _a(0.0), "experts.0.w": _a(10.0), "experts.1.w": _a(20.0), "experts.2.w": _a(30.0)}


def test_gate_by_examples_experts_by_routed_samples_untrained_expert_kept():
    updates = [
        ({"gate.w": _a(1.0), "experts.0.w": _a(2.0)}, {0: 30.0}, 100.0),
        ({"gate.w": _a(4.0), "experts.0.w": _a(6.0), "experts.1.w": _a(8.0)}, {0: 10.0, 1: 5.0}, 300.0),
    ]
    state, load = aggregate_experts(CURRENT, updates, 3)
    assert state["gate.w"][0] == pytest.approx((100 * 1 + 300 * 4) / 400)  # 3.25
    assert state["experts.0.w"][0] == pytest.approx((30 * 2 + 10 * 6) / 40)  # 3.0
    assert state["experts.1.w"][0] == pytest.approx(8.0)  # its only trainer
    assert state["experts.2.w"][0] == 30.0  # nobody trained it: unchanged
    np.testing.assert_allclose(load, [40.0, 5.0, 0.0])


def test_trained_expert_with_no_routed_samples_gets_equal_weights():
    updates = [
        ({"gate.w": _a(0.0), "experts.2.w": _a(1.0)}, {2: 0.0}, 1.0),
        ({"gate.w": _a(0.0), "experts.2.w": _a(3.0)}, {2: 0.0}, 1.0),
    ]
    state, _ = aggregate_experts(CURRENT, updates, 3)
    assert state["experts.2.w"][0] == pytest.approx(2.0)


class _Nodes:
    def get_node_ids(self):
        return [11, 12]


@pytest.mark.usefixtures("task_identity")
def test_strategy_sends_only_assigned_experts_and_aggregates_replies():
    profiles = {0: CapacityProfile(1.0, 1, 8.0, 0.0), 1: CapacityProfile(0.5, 2, 8.0, 0.0)}
    strategy = ExpertAssignment(
        rule="random", num_experts=3, clients={11: 0, 12: 1}, profiles=profiles,
        scores=AlignmentScores(2, 3), seed=0, min_available_nodes=2,
    )
    arrays = ArrayRecord({k: Array(v) for k, v in CURRENT.items()})
    msgs = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, arrays, ConfigRecord(), _Nodes())}
    for node, cap in ((11, 1), (12, 2)):
        assigned = list(msgs[node].content["config"]["assigned-experts"])
        assert len(assigned) == cap
        sent = set(msgs[node].content["arrays"].keys())
        assert sent == {"gate.w", *(f"experts.{j}.w" for j in assigned)}
        assert msgs[node].metadata.message_type == "train.moe"

    replies = []
    for node, m in msgs.items():
        assigned = list(m.content["config"]["assigned-experts"])
        out = ArrayRecord({k: Array(v.numpy() + 1) for k, v in m.content["arrays"].items()})
        metrics = MetricRecord({
            "num-examples": 10, "train-loss": 1.0, "seconds": 2.0,
            "expert-routed": [5.0] * len(assigned), "expert-improvement": [0.1] * len(assigned),
            "routing-share": [1 / 3] * 3,
        })
        replies.append(Message(RecordDict({"arrays": out, "metrics": metrics}), reply_to=m))
    state, metrics = strategy.aggregate_train(1, replies)
    assert state["gate.w"].numpy()[0] == pytest.approx(1.0)
    (log,) = strategy.history
    # 8 Mbit/s: bytes / 1e6 s each way (same entries down and up); the slow client (speed 0.5) computes 4 s
    slow = 4.0 + 2 * record_bytes(msgs[12].content["arrays"]) / 1e6
    assert log.sim_seconds == pytest.approx(slow)
    assert metrics["sim-seconds"] == pytest.approx(slow)
    assert strategy.scores.fitness.max() > 0 and strategy.scores.usage.sum() == pytest.approx(0.3)
