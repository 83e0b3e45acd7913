"""The one place that turns torch state dicts into Flower records and back,
and picks the entries of a state dict by parameter-name prefix."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeVar

import torch
from flwr.app import ArrayRecord
from torch import Tensor

from .constants import BANK_KEY_SEPARATOR

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
