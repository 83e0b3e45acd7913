"""RestartAwareGrid: a node that restarts while its message is in flight is answered at once, not waited for."""

import time
from uuid import uuid4

import pytest
from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.serverapp import Grid

from nmoe_flwr.strategies.restart_watch import NODE_RESTARTED, RestartAwareGrid
from nmoe_flwr.strategies.validation import origin

pytestmark = pytest.mark.usefixtures("task_identity")


class FakeLink(Grid):
    """Nodes 1 and 2; node 1 answers at once, node 2 never does. ``restart_at``: when node 2 comes back."""

    def __init__(self, restart_at: float | None = None, report_activation: bool = True) -> None:
        self.restart_at, self.report = restart_at, report_activation
        self.t0 = time.monotonic()
        self.sent: dict[str, Message] = {}

    def set_run(self, run):
        pass

    @property
    def run(self):
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self):
        return [1, 2]

    def get_nodes(self):
        restarted = self.restart_at is not None and time.monotonic() - self.t0 >= self.restart_at
        if not self.report:
            return [NodeInfo(node_id=n) for n in (1, 2)]
        return [NodeInfo(node_id=1, last_activated_at="t0"),
                NodeInfo(node_id=2, last_activated_at="t1" if restarted else "t0")]

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            self.sent[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [Message(RecordDict(), reply_to=self.sent.pop(m)) for m in message_ids
                if m in self.sent and self.sent[m].metadata.dst_node_id == 1]

    def send_and_receive(self, messages, *, timeout=None):
        raise AssertionError("the wrapper must not call the wrapped grid's send_and_receive")


def _send(grid, timeout):
    messages = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (1, 2)]
    t = time.monotonic()
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    return replies, time.monotonic() - t, {m.metadata.message_id: m.metadata.dst_node_id for m in messages}


def test_a_node_that_restarts_mid_round_gets_an_error_reply_at_once():
    grid = RestartAwareGrid(FakeLink(restart_at=0.3), poll=0.05, watch_every=0.1)
    replies, took, to = _send(grid, timeout=30)
    assert took < 5
    by_node = {origin(r, to): r for r in replies}
    assert sorted(by_node) == [1, 2]
    assert not by_node[1].has_error()
    assert by_node[2].has_error() and by_node[2].error.code == NODE_RESTARTED and "restarted" in by_node[2].error.reason


def test_without_a_restart_it_waits_until_the_timeout():
    grid = RestartAwareGrid(FakeLink(), poll=0.05, watch_every=0.1)
    replies, took, to = _send(grid, timeout=0.6)
    assert 0.55 <= took < 3
    assert [origin(r, to) for r in replies] == [1]


def test_nodes_without_activation_times_are_never_declared_lost():
    """The simulation's grid reports no activation times: plain waiting."""
    grid = RestartAwareGrid(FakeLink(restart_at=0.0, report_activation=False), poll=0.05, watch_every=0.1)
    replies, _, to = _send(grid, timeout=0.5)
    assert [origin(r, to) for r in replies] == [1]
