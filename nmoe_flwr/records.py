"""The one place that turns torch state dicts into Flower records and back,
packs them for the wire, and picks the entries of a state dict by
parameter-name prefix."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

import torch
from flwr.app import ArrayRecord
from torch import Tensor

from .constants import BANK_KEY_SEPARATOR, PACKED_MARK

V = TypeVar("V")


def to_record(state: Mapping[str, Tensor]) -> ArrayRecord:
    """ArrayRecord of a state dict (CPU copies; bf16/fp16 cast to fp32,
    which Flower's ``Array`` cannot carry losslessly)."""
    out = {}
    for key, value in state.items():
        value = value.detach().cpu()
        if value.dtype in (torch.bfloat16, torch.float16):
            value = value.float()
        out[key] = value
    return ArrayRecord(out)


def from_record(record: ArrayRecord) -> dict[str, Tensor]:
    """State dict (CPU tensors) of an ArrayRecord."""
    return dict(record.to_torch_state_dict()) if len(record) else {}


def packed_group(name: str, value: Tensor) -> str:
    """The packed entry ``"<first name component>.@<kind>"`` that entry ``name`` goes to.

    Kinds keep apart what aggregation treats apart: ``weights`` (float),
    ``running_stats`` (BatchNorm statistics: averaged, no server momentum,
    :func:`~nmoe_flwr.algorithms.server_momentum.takes_momentum`) and
    ``counters`` (integers, cast back after averaging). The group keeps the
    name's first component, so prefix selection (``"extractor."``,
    ``"shared."``) works on packed records as on plain ones.
    """
    kind = "counters" if not value.is_floating_point() else "running_stats" if "running_" in name else "weights"
    return f"{name.split('.', 1)[0]}.{PACKED_MARK}{kind}"


def pack(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Concatenate a state dict into one flat tensor per :func:`packed_group`, in the dict's order.

    Why: Flower moves every array of a message as its own object, one request
    each, between SuperLink, SuperNode and ClientApp process; a trained
    ResNet20 + head is 207 objects, packed 11. On the loopback deployment that
    took a FedCE message's start-up in the ClientApp from 11.5 to 2.5 s and
    the reply leg from 20 to 1.5 s (``benchmarks/deploy_timeline.py``, README
    "Deployment"). Averaging is element-wise, so FedAvg of packed records
    equals FedAvg of plain ones, bit for bit.
    """
    groups: dict[str, list[Tensor]] = {}
    for name, value in state.items():
        groups.setdefault(packed_group(name, value), []).append(value.detach().reshape(-1))
    return {group: torch.cat(parts) for group, parts in groups.items()}


def is_packed(keys: Iterable[str]) -> bool:
    """Whether record keys are packed groups (:func:`pack`)."""
    return any(PACKED_MARK in k for k in keys)


def unpack(packed: Mapping[str, Tensor], template: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`pack`: the entries of ``template`` (names, order, shapes, dtypes) whose group is in ``packed``.

    Raises
    ------
    ValueError
        A packed group whose length is not what the template's entries need.
    """
    used = dict.fromkeys(packed, 0)
    out = {}
    for name, ref in template.items():
        group = packed_group(name, ref)
        if group not in packed:
            continue
        start, n = used[group], ref.numel()
        if start + n > packed[group].numel():
            raise ValueError(f"packed entry {group!r} has {packed[group].numel()} values; the model needs more")
        out[name] = packed[group][start : start + n].reshape(ref.shape).to(ref.dtype)
        used[group] = start + n
    short = {g: (packed[g].numel(), n) for g, n in used.items() if n != packed[g].numel()}
    if short:
        raise ValueError(f"packed entries do not fit the model (values sent, values needed): {short}")
    return out


def bank_to_record(bank: Mapping[int, Mapping[str, Tensor]]) -> ArrayRecord:
    """Flatten ``{expert id: expert state}`` into one ArrayRecord
    (keys ``"<id>/<param>"``)."""
    return to_record({f"{i}{BANK_KEY_SEPARATOR}{k}": v for i, state in bank.items() for k, v in state.items()})


def bank_from_record(record: ArrayRecord) -> dict[int, dict[str, Tensor]]:
    """Inverse of :func:`bank_to_record`, ordered by expert id."""
    bank: dict[int, dict[str, Tensor]] = {}
    for key, value in from_record(record).items():
        i, name = key.split(BANK_KEY_SEPARATOR, 1)
        bank.setdefault(int(i), {})[name] = value
    return dict(sorted(bank.items()))


def state_subset(state: Mapping[str, Tensor], prefixes: Sequence[str]) -> dict[str, Tensor]:
    """Entries of a state dict whose names start with one of ``prefixes``."""
    return {k: v for k, v in state.items() if k.startswith(tuple(prefixes))}


def strip_prefix(state: Mapping[str, V], prefix: str) -> dict[str, V]:
    """The entries under ``prefix``, with the prefix removed (a sub-module's own
    state dict, or the metrics named ``prefix + key``)."""
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def add_prefix(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Every entry renamed ``prefix + name`` (inverse of :func:`strip_prefix`)."""
    return {prefix + k: v for k, v in state.items()}
