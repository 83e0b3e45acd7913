"""Issue 12.1: every strategy checks what it aggregates; a bad reply is dropped with a warning naming the node.

Hand-made replies for each case the issue lists, and a hypothesis test that a
corrupted reply never changes the aggregate of the others.
"""

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fedsc import _FakeGrid

from nmoe_flwr.algorithms.alignment import AlignmentScores
from nmoe_flwr.capacity import CapacityProfile
from nmoe_flwr.constants import CORRELATION, R_EXT_KEY
from nmoe_flwr.strategies import ExpertAssignment, FedSC, PartialFedAvg
from nmoe_flwr.strategies.validation import RoundFailed

pytestmark = pytest.mark.usefixtures("task_identity")


class _Nodes:
    def __init__(self, ids):
        self.ids = ids

    def get_node_ids(self):
        return self.ids


@pytest.fixture
def warnings_logged():
    """WARNING lines of Flower's logger during the test."""
    lines: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                lines.append(record.getMessage())

    handler = _Keep()
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


SENT = {"shared.w": np.array([1.0, 2.0], dtype=np.float32), "shared.b": np.array([0.0], dtype=np.float32)}


def _partial(nodes=(1, 2, 3), **kwargs):
    strategy = PartialFedAvg(["shared."], min_available_nodes=1, **kwargs)
    arrays = ArrayRecord({**{k: Array(v) for k, v in SENT.items()}, "decision.w": Array(np.zeros(3, np.float32))})
    queries = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, arrays, ConfigRecord(), _Nodes(list(nodes)))}
    return strategy, queries


def _answer(query, arrays=None, metrics=None, **records):
    arrays = SENT if arrays is None else arrays
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": 10, "train-loss": 0.5} if metrics is None else metrics),
        **records,
    })
    return Message(content, reply_to=query)


def _w(value):
    return {"shared.w": np.full(2, value, np.float32), "shared.b": np.zeros(1, np.float32)}


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ({"arrays": {"shared.w": np.array([5.0], np.float32), "shared.b": np.zeros(1, np.float32)}},
         "entry 'shared.w' is float32[1], expected float32[2]"),  # broadcastable: FedAvg would take it
        ({"arrays": {"shared.w": np.array([np.nan, 1], np.float32), "shared.b": np.zeros(1, np.float32)}},
         "entry 'shared.w' has non-finite values"),
        ({"arrays": {"shared.w": np.array([1, 0], bool), "shared.b": np.zeros(1, np.float32)}},
         "entry 'shared.w' has dtype bool, expected a real number type like float32"),
        ({"arrays": {"shared.w": np.ones(2, np.float32)}}, "missing entries ['shared.b']"),
        ({"arrays": {**SENT, "shared.extra": np.ones(1, np.float32)}}, "unexpected entries ['shared.extra']"),
        ({"metrics": {"train-loss": 0.5}}, "missing metrics ['num-examples']"),
        ({"metrics": {"num-examples": 0, "train-loss": 0.5}}, "'num-examples' = 0 is not positive"),
        ({"metrics": {"num-examples": 10, "train-loss": float("inf")}}, "non-finite metrics ['train-loss']"),
        ({"more": MetricRecord({"x": 1.0})}, "2 metric records, expected 1"),
        ({"other": ArrayRecord({"x": Array(np.ones(1, np.float32))})}, "array records ['arrays', 'other']"),
    ],
)
def test_partial_fedavg_drops_a_bad_reply_and_averages_the_rest(bad, reason, warnings_logged):
    strategy, q = _partial()
    records = {k: v for k, v in bad.items() if k not in ("arrays", "metrics")}
    replies = [_answer(q[1], _w(1.0)), _answer(q[2], _w(3.0)),
               _answer(q[3], bad.get("arrays"), bad.get("metrics"), **records)]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["shared.w"].numpy(), [2.0, 2.0])  # nodes 1 and 2 only
    assert any("node 3 dropped" in line and reason in line for line in warnings_logged), warnings_logged


def test_another_real_dtype_is_averaged_and_the_sent_dtype_kept():
    """A client may return an int64 counter the server's average had turned into float64 (BatchNorm)."""
    strategy, q = _partial(nodes=(1, 2))
    w64 = {k: v.astype(np.float64) for k, v in _w(3.0).items()}
    arrays, _ = strategy.aggregate_train(1, [_answer(q[1], _w(1.0)), _answer(q[2], w64)])
    assert arrays["shared.w"].dtype == "float32"
    np.testing.assert_allclose(arrays["shared.w"].numpy(), [2.0, 2.0])


def test_one_extra_metric_does_not_cost_the_round(warnings_logged):
    strategy, q = _partial()
    replies = [_answer(q[1], _w(1.0)), _answer(q[2], _w(3.0), {"num-examples": 10, "train-loss": 0.5, "mine": 1.0})]
    arrays, metrics = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["shared.w"].numpy(), [2.0, 2.0])
    assert "mine" not in metrics and any("'mine'" in line for line in warnings_logged)


def test_too_few_valid_replies_fail_with_every_reason():
    strategy, q = _partial(min_replies=2)
    replies = [_answer(q[1], _w(1.0)), _answer(q[2], metrics={"num-examples": 0, "train-loss": 0.5}),
               _answer(q[3], metrics={"train-loss": 0.5})]
    with pytest.raises(RoundFailed) as info:
        strategy.aggregate_train(1, replies)
    message = str(info.value)
    assert "1 valid replies, fewer than the 2 required" in message
    assert "node 2: 'num-examples' = 0 is not positive" in message and "node 3: missing metrics" in message


def test_all_zero_weights_are_a_clear_failure_not_a_zero_division():
    strategy, q = _partial(nodes=(1, 2))
    zero = {"num-examples": 0, "train-loss": 0.5}
    with pytest.raises(RoundFailed, match="0 valid replies"):
        strategy.aggregate_train(1, [_answer(q[1], metrics=zero), _answer(q[2], metrics=zero)])


CORRUPTIONS = [
    "short", "long", "nan", "inf", "dtype", "missing-entry", "extra-entry", "no-weight", "zero-weight",
    "negative-weight", "nan-weight", "nan-metric", "two-metric-records", "renamed-arrays", "error",
]


def _corrupt(query, kind: str, value: float) -> Message:
    w = _w(value)
    metrics = {"num-examples": 10, "train-loss": 0.5}
    if kind == "error":
        from flwr.app import Error

        return Message(Error(code=0, reason="client crashed"), reply_to=query)
    if kind == "short":
        w["shared.w"] = w["shared.w"][:1]
    elif kind == "long":
        w["shared.w"] = np.ones(3, np.float32)
    elif kind in ("nan", "inf"):
        w["shared.w"][0] = float(kind)
    elif kind == "dtype":
        w["shared.w"] = w["shared.w"] > 0
    elif kind == "missing-entry":
        del w["shared.b"]
    elif kind == "extra-entry":
        w["shared.zzz"] = np.ones(1, np.float32)
    elif kind == "no-weight":
        del metrics["num-examples"]
    elif kind.endswith("-weight"):
        metrics["num-examples"] = {"zero-weight": 0, "negative-weight": -5, "nan-weight": float("nan")}[kind]
    elif kind == "nan-metric":
        metrics["train-loss"] = float("nan")
    if kind == "two-metric-records":
        return _answer(query, w, metrics, more=MetricRecord({"x": 1.0}))
    if kind == "renamed-arrays":
        content = RecordDict({"weights": ArrayRecord({k: Array(v) for k, v in w.items()}), "metrics": MetricRecord(metrics)})
        return Message(content, reply_to=query)
    return _answer(query, w, metrics)


@pytest.mark.parametrize("kind", CORRUPTIONS)  # every kind, each with random values, weights and position
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    values=st.lists(st.floats(-10, 10, width=32), min_size=3, max_size=3),
    weights=st.lists(st.integers(1, 100), min_size=3, max_size=3),
    bad=st.integers(0, 2),
)
def test_a_corrupted_reply_never_changes_the_others_aggregate(kind, values, weights, bad):
    strategy, q = _partial()
    replies = []
    for i, node in enumerate((1, 2, 3)):
        if i == bad:
            replies.append(_corrupt(q[node], kind, values[i]))
        else:
            replies.append(_answer(q[node], _w(values[i]), {"num-examples": weights[i], "train-loss": 0.5}))
    arrays, _ = strategy.aggregate_train(1, replies)
    good = [i for i in range(3) if i != bad]
    expected = sum(values[i] * weights[i] for i in good) / sum(weights[i] for i in good)
    np.testing.assert_allclose(arrays["shared.w"].numpy(), [expected, expected], rtol=1e-5, atol=1e-5)


# --- FedSC -------------------------------------------------------------------------------------------


def test_fedsc_keeps_a_wrong_shape_or_nan_matrix_out_of_every_r_ext(warnings_logged):
    eye = np.eye(2).tolist()
    grid = _FakeGrid({1: eye, 2: (3 * np.eye(2)).tolist(), 3: [[100.0]], 4: [[np.nan, 0], [0, 1]]},
                     {1: 100, 2: 100, 3: 100, 4: 100})
    strategy = FedSC(min_available_nodes=4)  # d from the most common shape: (2, 2)
    msgs = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid)}
    assert sorted(msgs) == [1, 2]  # nodes 3 and 4 failed the correlation phase: left out of this round
    np.testing.assert_allclose(msgs[1].content[CORRELATION][R_EXT_KEY].numpy(), 3 * np.eye(2))
    np.testing.assert_allclose(msgs[2].content[CORRELATION][R_EXT_KEY].numpy(), np.eye(2))
    assert any("node 3 dropped" in w and "float32[1, 1], expected float32[2, 2]" in w for w in warnings_logged)
    assert any("node 4 dropped" in w and "non-finite" in w for w in warnings_logged)
    assert strategy.releases == {1: 1, 2: 1}


def test_fedsc_given_dimension_wins_over_the_majority():
    grid = _FakeGrid({1: [[1.0]], 2: [[2.0]], 3: np.eye(2).tolist()}, {1: 1, 2: 1, 3: 1})
    strategy = FedSC(correlation_dim=2, min_available_nodes=3)
    with pytest.raises(RoundFailed, match="1 valid replies, fewer than the 2 required"):
        FedSC(correlation_dim=2, min_available_nodes=3, min_replies=2).configure_train(
            1, ArrayRecord(), ConfigRecord(), grid)
    msgs = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    assert [m.metadata.dst_node_id for m in msgs] == [3]


def test_fedsc_training_replies_are_checked_against_what_was_sent():
    grid = _FakeGrid({1: [[1.0]], 2: [[2.0]]}, {1: 1, 2: 1})
    strategy = FedSC(min_available_nodes=2)
    sent = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    msgs = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, sent, ConfigRecord(), grid)}
    good = Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.full(2, 4.0, np.float32))}),
                               "metrics": MetricRecord({"num-examples": 5})}), reply_to=msgs[1])
    bad = Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.full(1, 9.0, np.float32))}),
                              "metrics": MetricRecord({"num-examples": 5})}), reply_to=msgs[2])
    arrays, _ = strategy.aggregate_train(1, [good, bad])
    np.testing.assert_allclose(arrays["w"].numpy(), [4.0, 4.0])


# --- ExpertAssignment -----------------------------------------------------------------------------------


def _assignment():
    profiles = {0: CapacityProfile(1.0, 1, 8.0, 0.0), 1: CapacityProfile(1.0, 1, 8.0, 0.0)}
    strategy = ExpertAssignment(rule="random", num_experts=3, clients={11: 0, 12: 1}, profiles=profiles,
                                scores=AlignmentScores(2, 3), seed=0, min_available_nodes=2)
    current = {"gate.w": np.zeros(1, np.float32), **{f"experts.{j}.w": np.full(1, 10.0 * j, np.float32) for j in range(3)}}
    arrays = ArrayRecord({k: Array(v) for k, v in current.items()})
    msgs = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, arrays, ConfigRecord(), _Nodes([11, 12]))}
    return strategy, msgs


def _moe_reply(query, arrays, **metric_changes):
    n = len(list(query.content["config"]["assigned-experts"]))
    metrics = {"num-examples": 10, "train-loss": 1.0, "seconds": 1.0, "expert-routed": [5.0] * n,
               "expert-improvement": [0.1] * n, "routing-share": [1 / 3] * 3, **metric_changes}
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in arrays.items()}),
                          "metrics": MetricRecord({k: v for k, v in metrics.items() if v is not None})})
    return Message(content, reply_to=query)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("unassigned-expert", "unexpected entries"),
        ("missing-metric", "missing metrics ['seconds']"),
        ("short-share", "metric 'routing-share' must be a list of 3 values"),
    ],
)
def test_expert_assignment_refuses_writes_outside_the_assignment_and_broken_metrics(change, reason, warnings_logged):
    strategy, msgs = _assignment()
    sent = {node: {k: v.numpy() + 1 for k, v in m.content["arrays"].items()} for node, m in msgs.items()}
    (own,) = list(msgs[12].content["config"]["assigned-experts"])
    changes = {}
    if change == "unassigned-expert":
        other = (own + 1) % 3
        sent[12][f"experts.{other}.w"] = np.full(1, -999.0, np.float32)
    elif change == "missing-metric":
        changes["seconds"] = None
    else:
        changes["routing-share"] = [1.0]
    replies = [_moe_reply(msgs[11], sent[11]), _moe_reply(msgs[12], sent[12], **changes)]
    state, _ = strategy.aggregate_train(1, replies)
    (assigned_11,) = list(msgs[11].content["config"]["assigned-experts"])
    for j in range(3):  # only node 11's expert moved; nothing of node 12 was taken
        expected = 10.0 * j + (1.0 if j == assigned_11 else 0.0)
        assert state[f"experts.{j}.w"].numpy()[0] == pytest.approx(expected)
    assert any("node 12 dropped" in w and reason in w for w in warnings_logged), warnings_logged


def test_expert_assignment_evaluation_with_zero_examples_is_dropped_not_divided():
    strategy, msgs = _assignment()
    good = Message(RecordDict({"metrics": MetricRecord({"num-examples": 10, "accuracy": 0.8})}), reply_to=msgs[11])
    zero = Message(RecordDict({"metrics": MetricRecord({"num-examples": 0, "accuracy": 0.1})}), reply_to=msgs[12])
    metrics = strategy.aggregate_evaluate(1, [good, zero])
    assert metrics["accuracy"] == pytest.approx(0.8)
