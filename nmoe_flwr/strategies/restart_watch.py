"""A Grid that stops waiting for a node which restarted while its message was in flight.

Flower's deployment grid waits for every reply until the round's timeout.
When a SuperNode dies, the SuperLink answers its message itself ("Node
Unavailable") once it counts the node offline *and* the ServerApp pulls
while it is offline. A SuperNode restarted under the same key (same node
id) before that pull never answers the message it lost, and nothing else
does: the round waits for ``round-timeout`` (README, "A SuperNode that
dies"). The SuperLink does record every return to ONLINE
(``NodeInfo.last_activated_at``), so :class:`RestartAwareGrid` compares it
with the value at push time and answers a message whose node came back (or
is gone) with an error reply of its own, which the strategies already treat
as a lost reply.

It also pulls every ``poll`` seconds instead of the deployment grid's fixed 3 s,
which takes up to 3 s off each round of a deployment.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import WARNING

from flwr.app import Error, Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore import log

NODE_RESTARTED = 1001
"""Error code of the reply written here for a node that restarted or left while its message was in flight."""


class RestartAwareGrid(Grid):
    """Wrap a :class:`~flwr.serverapp.Grid`; only :meth:`send_and_receive` differs.

    Parameters
    ----------
    grid : Grid
        The grid Flower gave the ServerApp.
    poll : float
        Seconds between pulls of the pending replies.
    watch_every : float
        Seconds between looks at the nodes' activation times (one
        ``get_nodes`` call; the simulation's in-memory grid reports fixed
        times, so nothing changes there).
    """

    def __init__(self, grid: Grid, poll: float = 0.2, watch_every: float = 2.0) -> None:
        self._grid = grid
        self.poll = poll
        self.watch_every = watch_every

    # Plain delegation: the rest of the Grid interface is the wrapped grid's.
    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def activations(self) -> dict[int, str]:
        """``{node id: last_activated_at}`` of the nodes that report one."""
        return {n.node_id: n.last_activated_at for n in self.get_nodes() if n.HasField("last_activated_at")}

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages`` and pull their replies until all are in or ``timeout`` s have passed.

        A message whose destination node restarted (its ``last_activated_at``
        changed) or left the SuperLink's node list since the push gets an
        error reply (code :data:`NODE_RESTARTED`) at once instead of being
        waited for. Without a timeout it waits for ever, as Flower's grids do.
        """
        messages = list(messages)
        before = self.activations()
        ids = list(self.push_messages(messages))
        pending = dict(zip(ids, messages, strict=True))
        replies: list[Message] = []
        end = None if timeout is None else time.monotonic() + timeout
        next_watch = time.monotonic() + self.watch_every
        while pending:
            got = list(self.pull_messages(list(pending)))
            for reply in got:
                pending.pop(reply.metadata.reply_to_message_id, None)
            replies += got
            if not pending or (end is not None and time.monotonic() >= end):
                break
            if time.monotonic() >= next_watch:
                replies += self._lost(pending, before)
                next_watch = time.monotonic() + self.watch_every
            time.sleep(self.poll)
        return replies

    def _lost(self, pending: dict[str, Message], before: dict[int, str]) -> list[Message]:
        """Error replies for the pending messages whose node restarted or left (removed from ``pending``)."""
        now = self.activations()
        lost = []
        for message_id, msg in list(pending.items()):
            node = msg.metadata.dst_node_id
            if node in before and now.get(node) != before[node]:
                why = "restarted" if node in now else "left"
                log(WARNING, "Node %s %s while its %s message was in flight: its reply is lost", node, why,
                    msg.metadata.message_type)
                lost.append(Message(Error(NODE_RESTARTED, f"node {why} while the message was in flight"), reply_to=msg))
                del pending[message_id]
        return lost
