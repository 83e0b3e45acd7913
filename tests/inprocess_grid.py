"""A Flower ``Grid`` that delivers every message to a ClientApp in this process.

Lets a test drive the real strategies (``strategy.start(grid=...)``) and the
real ``ClientApp`` without a SuperLink, SuperNodes or Ray::

    from inprocess_grid import InProcessGrid

    grid = InProcessGrid(client_app.app, run_config, num_nodes=2)
    result = PartialFedAvg(...).start(grid=grid, initial_arrays=..., num_rounds=2)

Each node has its own ``Context`` (``node_config`` with ``partition-id`` and
``num-partitions``, the run config, and a ``state`` RecordDict that persists
across messages). Messages, replies and contexts go through Flower's protobuf
serialisation on the way, as they would between processes, so a handler can
neither see the server's objects nor keep references into them. Handlers run
one after another, in the order the messages were pushed. A handler that raises
produces an error reply (``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``), like a
SuperNode's.

Flower 1.41 stamps new messages with the running task's identity: use the
``task_identity`` fixture of ``conftest.py`` with this grid.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=E0611
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.run import Run

ClientAppLike = Callable[[Message, Context], Message]


def wire_copy(message: Message) -> Message:
    """The message as the other side of a connection would see it (protobuf round trip)."""
    return message_from_proto(ProtoMessage.FromString(message_to_proto(message).SerializeToString()))


def _context_copy(context: Context) -> Context:
    return context_from_proto(ProtoContext.FromString(context_to_proto(context).SerializeToString()))


class InProcessGrid(Grid):
    """Synchronous in-process Grid over ``num_nodes`` nodes running ``app``.

    Parameters
    ----------
    app : ClientApp or callable
        ``app(message, context) -> reply``; a ``flwr.clientapp.ClientApp``
        dispatches by message type.
    run_config : mapping
        The run config every node's Context carries.
    num_nodes : int
        Nodes ``node_ids[i]`` get ``partition-id = i``.
    node_ids : sequence of int, optional
        Defaults to ``1001, 1002, ...`` (deliberately not the partition ids).
    run_id : int
    """

    def __init__(
        self,
        app: ClientAppLike,
        run_config: dict[str, Any],
        num_nodes: int,
        node_ids: Sequence[int] | None = None,
        run_id: int = 1,
    ) -> None:
        self.app = app
        self.node_ids = list(node_ids) if node_ids is not None else [1001 + i for i in range(num_nodes)]
        if len(self.node_ids) != num_nodes:
            raise ValueError(f"{len(self.node_ids)} node ids for {num_nodes} nodes")
        self.contexts = {
            node: Context(
                run_id=run_id, node_id=node, node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(), run_config=dict(run_config),
            )
            for i, node in enumerate(self.node_ids)
        }
        self._run = Run.create_empty(run_id)
        self._replies: dict[str, Message] = {}
        self.delivered: list[tuple[int, str]] = []  # (node id, message type) of every message handled

    # --- Grid API ---------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node not in self.contexts:
                raise ValueError(f"no node {node}; nodes are {self.node_ids}")
            msg.metadata.__dict__["_message_id"] = str(uuid4())  # what a SuperLink does
            self._replies[msg.metadata.message_id] = self._deliver(node, wire_copy(msg))
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    # --- the node's side ----------------------------------------------------
    def _deliver(self, node: int, msg: Message) -> Message:
        context = _context_copy(self.contexts[node])
        self.delivered.append((node, msg.metadata.message_type))
        try:
            reply = self.app(msg, context)
        except Exception as exc:  # noqa: BLE001 -- a SuperNode turns any exception into an error reply
            reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(exc).__name__}: {exc}"), reply_to=msg)
        self.contexts[node] = context  # the state a handler wrote persists for the node's next message
        reply = wire_copy(reply)
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        return reply
