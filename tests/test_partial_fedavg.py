"""PartialFedAvg: shared entries averaged by example count, local ones never sent nor averaged."""

import pytest as _pytest

pytestmark = _pytest.mark.usefixtures("task_identity")

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from nmoe_flwr.constants import SHARED_PREFIXES
from nmoe_flwr.strategies import PartialFedAvg, split_shared


class _Nodes:
    """The part of a Grid that configure_train uses: the connected node ids."""

    def __init__(self, ids):
        self.ids = ids

    def get_node_ids(self):
        return self.ids


def _reply(arrays: dict, num_examples: int) -> Message:
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": num_examples, "train-loss": float(num_examples)}),
    })
    return Message(content, dst_node_id=1, message_type="train.gate")


def _arrays(**entries) -> ArrayRecord:
    return ArrayRecord({k.replace("__", "."): Array(np.asarray(v, dtype=np.float32)) for k, v in entries.items()})


def test_configure_train_sends_only_shared_entries_with_prefixes_and_message_type():
    strategy = PartialFedAvg(["shared."], train_message_type="train.gate", min_available_nodes=2)
    config = ConfigRecord({"num-rounds": 3})
    msgs = list(strategy.configure_train(1, _arrays(shared__w=[1.0], decision__w=[2.0]), config, _Nodes([7, 9])))
    assert sorted(m.metadata.dst_node_id for m in msgs) == [7, 9]
    for m in msgs:
        assert m.metadata.message_type == "train.gate"
        assert list(m.content["arrays"].keys()) == ["shared.w"]
        assert list(m.content["config"][SHARED_PREFIXES]) == ["shared."]
        assert m.content["config"]["server-round"] == 1


def _configured(prefixes, **entries) -> PartialFedAvg:
    """A strategy that has sent ``entries`` (so replies can be checked against them)."""
    strategy = PartialFedAvg(prefixes, min_available_nodes=1)
    list(strategy.configure_train(1, _arrays(**entries), ConfigRecord(), _Nodes([1, 2])))
    return strategy


def test_shared_entries_are_averaged_by_example_count():
    strategy = _configured(["shared."], shared__w=[0.0, 0.0])
    replies = [_reply({"shared.w": [1.0, 2.0]}, 1), _reply({"shared.w": [3.0, 6.0]}, 3)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    # (1*[1, 2] + 3*[3, 6]) / 4 = [2.5, 5.0]; train-loss (1*1 + 3*3) / 4 = 2.5
    np.testing.assert_allclose(arrays["shared.w"].numpy(), [2.5, 5.0])
    assert metrics["train-loss"] == pytest.approx(2.5)


def test_local_entries_in_replies_are_dropped_not_averaged():
    strategy = _configured(["shared."], shared__w=[0.0], decision__w=[0.0])
    replies = [
        _reply({"shared.w": [0.0], "decision.w": [100.0]}, 2),
        _reply({"shared.w": [4.0], "decision.w": [-100.0]}, 2),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert list(arrays.keys()) == ["shared.w"]
    np.testing.assert_allclose(arrays["shared.w"].numpy(), [2.0])


def test_no_shared_prefixes_means_nothing_travels():
    strategy = PartialFedAvg([])
    msgs = list(strategy.configure_train(1, _arrays(shared__w=[1.0]), ConfigRecord(), _Nodes([1, 2])))
    assert all(len(m.content["arrays"]) == 0 for m in msgs)
    arrays, _ = strategy.aggregate_train(1, [_reply({}, 1), _reply({}, 2)])
    assert len(arrays) == 0


def test_split_shared_reports_what_it_left_out():
    shared, dropped = split_shared(_arrays(extractor__a=[1], head__b=[2]), ("extractor.",))
    assert list(shared.keys()) == ["extractor.a"] and dropped == ["head.b"]


def _average_of_partitions(node_of: dict[int, int], node_order: dict[int, int] | None) -> np.ndarray:
    """One round in which partition p (on node ``node_of[p]``) returns ``VALUES[p]``; the average."""
    strategy = PartialFedAvg(["shared."], min_available_nodes=3, node_order=node_order)
    msgs = list(strategy.configure_train(1, _arrays(shared__w=[0.0]), ConfigRecord(), _Nodes(sorted(node_of.values()))))
    to = {m.metadata.dst_node_id: m for m in msgs}
    replies = [Message(RecordDict({"arrays": _arrays(shared__w=[VALUES[p]]),
                                   "metrics": MetricRecord({"num-examples": 1})}), reply_to=to[node])
               for p, node in node_of.items()]
    arrays, _ = strategy.aggregate_train(1, reversed(replies))  # arrival order: anything
    return arrays["shared.w"].numpy()


# Float32 sums that depend on their order: (1e8 + 1) - 1e8 = 0 but (1e8 - 1e8) + 1 = 1.
VALUES = {0: 1e8, 1: 1.0, 2: -1e8}


def test_replies_are_summed_in_partition_order_whatever_the_node_ids():
    """Two Flower runs of one seed draw different node ids for the same partitions; with the partition
    ids as node_order they average to the same bits (without it, here, they do not)."""
    run_a = {0: 11, 1: 22, 2: 33}  # partition -> node id
    run_b = {0: 22, 1: 33, 2: 11}  # by node id: p2, p0, p1, so (-1e8 + 1e8) + 1 instead of (1e8 + 1) - 1e8
    by_rank = [_average_of_partitions(run, {n: p for p, n in run.items()}) for run in (run_a, run_b)]
    assert by_rank[0].tobytes() == by_rank[1].tobytes()
    by_node_id = [_average_of_partitions(run, None) for run in (run_a, run_b)]
    assert by_node_id[0].tobytes() != by_node_id[1].tobytes()  # the order matters for these values
