"""Checks on client replies, shared by every strategy of this package.

Replies come from devices nobody controls. Before a strategy aggregates, each
reply is checked against what the server sent or what the strategy's client
contract says comes back: the expected array entries with their shapes (no
more, no fewer) and a real number type, finite values, the required metrics, a positive
finite weight. A reply that fails is dropped for that round with a WARNING
naming the node and the reason; the round goes on with the rest, and fails
with :class:`RoundFailed` when fewer than the strategy's ``min_replies``
valid replies remain.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.supercore import log

from .nodes import rank_key

ArraySpec = Mapping[str, tuple[tuple[int, ...], str]]
"""Expected array entries: name -> (shape, dtype name)."""

ReplyCheck = Callable[[Message], "str | None"]
"""A check of one reply: the reason it is refused, or ``None``."""


class RoundFailed(RuntimeError):
    """Too few valid replies to aggregate a round (the message names the nodes and reasons)."""


def array_spec(record: ArrayRecord) -> dict[str, tuple[tuple[int, ...], str]]:
    """The :data:`ArraySpec` of ``record`` (what a reply to it must match)."""
    return {k: (tuple(a.shape), str(a.dtype)) for k, a in record.items()}


def array_problem(record: ArrayRecord | None, expected: ArraySpec) -> str | None:
    """Why ``record`` does not match ``expected`` (keys, shapes, dtypes, finite values), or ``None``."""
    if record is None:
        return "no ArrayRecord"
    missing = [k for k in expected if k not in record]
    if missing:
        return f"missing entries {missing[:5]}"
    extra = [k for k in record if k not in expected]
    if extra:
        return f"unexpected entries {extra[:5]}"
    for key, (shape, dtype) in expected.items():
        array = record[key]
        if tuple(array.shape) != tuple(shape):
            return f"entry {key!r} is {array.dtype}{list(array.shape)}, expected {dtype}{list(shape)}"
        values = array.numpy()
        # Any real number type is averaged like the sent one (a client may keep an int64
        # counter that the server's average turned into float64); bool or complex is not a weight.
        if values.dtype.kind not in "iuf":
            return f"entry {key!r} has dtype {values.dtype}, expected a real number type like {dtype}"
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            return f"entry {key!r} has non-finite values"
    return None


def cast_like(record: ArrayRecord, expected: ArraySpec) -> ArrayRecord:
    """``record`` with every entry in the dtype of ``expected`` (the average of int64 counters is float64)."""
    out = {}
    for key, array in record.items():
        dtype = expected.get(key, (None, str(array.dtype)))[1]
        out[key] = array if str(array.dtype) == dtype else Array(np.asarray(array.numpy(), dtype=dtype))
    return ArrayRecord(out)


def _finite(value) -> bool:
    items = value if isinstance(value, list) else [value]
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in items)


def metric_problem(record: MetricRecord | None, required: Iterable[str], weight_key: str) -> str | None:
    """Why ``record`` lacks a required metric, holds a non-finite value or a weight that is not > 0, or ``None``."""
    if record is None:
        return "no MetricRecord"
    missing = [k for k in (*required, weight_key) if k not in record]
    if missing:
        return f"missing metrics {sorted(set(missing))}"
    bad = [k for k, v in record.items() if not _finite(v)]
    if bad:
        return f"non-finite metrics {bad[:5]}"
    if not float(record[weight_key]) > 0:
        return f"{weight_key!r} = {record[weight_key]} is not positive"
    return None


def single_records(reply: Message, array_key: str | None) -> tuple[ArrayRecord | None, MetricRecord | None, str | None]:
    """The reply's ArrayRecord ``array_key`` and its only MetricRecord, or the reason they are not there.

    Flower's FedAvg refuses a *whole round* when one reply carries two
    MetricRecords or another ArrayRecord name, so these are per-reply checks here.
    """
    content = reply.content
    arrays = None
    if array_key is not None:
        if list(content.array_records) != [array_key]:
            return None, None, f"array records {list(content.array_records)}, expected [{array_key!r}]"
        arrays = content.array_records[array_key]
    if len(content.metric_records) != 1:
        return None, None, f"{len(content.metric_records)} metric records, expected 1"
    return arrays, next(iter(content.metric_records.values())), None


def fedavg_reply_problem(reply: Message, array_key: str, sent: ArraySpec, weight_key: str) -> str | None:
    """FedAvg's client contract: one ArrayRecord ``array_key`` with exactly the ``sent`` entries, one
    MetricRecord with a positive ``weight_key``. The reason a reply breaks it, or ``None``."""
    arrays, metrics, problem = single_records(reply, array_key)
    return problem or array_problem(arrays, sent) or metric_problem(metrics, (), weight_key)


def origin(reply: Message, sent: Mapping[str, int]) -> int:
    """The node a reply stands for.

    The SuperLink writes the error reply for a node it counts as offline
    ("Node Unavailable") itself, with its own id as the sender; the message
    it answers (``sent``: message id -> destination node) names the node.
    """
    if reply.has_error():
        return sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
    return reply.metadata.src_node_id


def screen(
    replies: Iterable[Message],
    check: ReplyCheck,
    *,
    what: str,
    server_round: int,
    min_replies: int = 1,
    sent: Sequence[Message] = (),
    dropped: dict[int, str] | None = None,
    order: Mapping[int, int] | None = None,
) -> list[Message]:
    """The replies that pass ``check``, in node order; a WARNING for every other one.

    The order fixes the float sums of the aggregation that follows, whatever
    the arrival order. Node ids are drawn anew by every Flower run, so with
    ``order`` (node id -> a stable rank such as the partition id) the replies
    are sorted by rank instead and two runs of one seed sum in the same order.

    Parameters
    ----------
    replies : the round's replies (error replies are dropped and logged too)
    check : ``reply -> reason or None``
    what : name of the phase for the log, e.g. ``"train"`` or ``"correlation"``
    server_round : the round, for the log
    min_replies : fewest valid replies the round may be aggregated from
    sent : the messages of the round (after sending, so with their ids);
        nodes that did not answer in time are logged and recorded as
        missing, and SuperLink-written error replies are put on their node
    dropped : filled with ``{node: reason}`` of every reply not used
    order : stable rank of each node id (:func:`~nmoe_flwr.strategies.nodes.rank_key`);
        ``None``: by node id

    Raises
    ------
    RoundFailed
        Fewer than ``min_replies`` valid replies; the message lists every
        dropped node and why.
    """
    dropped = {} if dropped is None else dropped
    to = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
    valid = []
    rank = rank_key(order)
    replies = sorted(replies, key=lambda r: rank(origin(r, to)))
    for reply in replies:
        node = origin(reply, to)
        reason = f"error reply: {reply.error.reason}" if reply.has_error() else check(reply)
        if reason is None:
            valid.append(reply)
            continue
        dropped[node] = reason
        log(WARNING, "Round %d (%s): reply of node %s dropped: %s", server_round, what, node, reason)
    answered = {origin(r, to) for r in replies}
    for node in sorted({m.metadata.dst_node_id for m in sent} - answered):
        dropped[node] = "no reply within the round timeout"
        log(WARNING, "Round %d (%s): node %s did not reply in time", server_round, what, node)
    if len(valid) < min_replies:
        raise RoundFailed(
            f"round {server_round} ({what}): {len(valid)} valid replies, fewer than the {min_replies} required; "
            + ("dropped: " + "; ".join(f"node {n}: {r}" for n, r in dropped.items()) if dropped else "no replies arrived")
        )
    return valid


def common_metrics(replies: Sequence[Message], keep: Iterable[str] = ()) -> None:
    """Reduce every reply's MetricRecord to the keys all of them carry (plus nothing else).

    Flower's metric aggregation refuses the whole round if one reply has an
    extra key; an extra metric from one device is not worth a lost round.
    Keys in ``keep`` are required by the check, so they are always common.
    """
    if not replies:
        return
    records = [next(iter(r.content.metric_records.items())) for r in replies]
    shared = set.intersection(*(set(rec) for _, rec in records)) | set(keep)
    for reply, (name, rec) in zip(replies, records):
        extra = [k for k in rec if k not in shared]
        if extra:
            log(WARNING, "Node %s: metrics %s not sent by every node; left out", reply.metadata.src_node_id, extra[:5])
            reply.content[name] = MetricRecord({k: v for k, v in rec.items() if k in shared})
