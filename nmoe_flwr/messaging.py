"""Server-side messaging helpers: one message per node, replies checked."""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from .constants import ARRAYS, CONFIG, METRICS


class ClientFailure(RuntimeError):
    """A client replied with an error; the run cannot go on."""


def send_to_all(grid: Grid, contents: Mapping[int, RecordDict], message_type: str, timeout: float) -> dict[int, RecordDict]:
    """Send one message per node and return ``{node id: reply content}``.

    Raises
    ------
    ClientFailure
        If any node fails or does not answer in time.
    """
    messages = [Message(content, dst_node_id=node, message_type=message_type) for node, content in contents.items()]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    errors = [f"node {r.metadata.src_node_id}: {r.error.reason}" for r in replies if r.has_error()]
    if errors or len(replies) != len(messages):
        raise ClientFailure(f"{message_type}: {len(replies)}/{len(messages)} replies; errors: {errors}")
    return {r.metadata.src_node_id: r.content for r in replies}


def broadcast(grid: Grid, pids: Mapping[int, int], content: RecordDict, message_type: str, timeout: float) -> dict[int, RecordDict]:
    """Send the same content to every node; replies keyed by partition id."""
    replies = send_to_all(grid, {node: content for node in pids}, message_type, timeout)
    return {pids[node]: reply for node, reply in replies.items()}


def metrics_of(replies: Mapping[int, RecordDict]) -> dict[int, dict[str, float]]:
    """The MetricRecord of every reply, as plain dicts."""
    return {pid: dict(reply[METRICS]) for pid, reply in replies.items()}


def weights_message(arrays: ArrayRecord) -> RecordDict:
    """Content of a message that carries model weights and an empty config."""
    return RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord()})
