"""Tensors on the wire: raw little-endian bytes behind an explicit header.

Nothing received from the network is unpickled. A message is::

    b"NMOE" | version u8 | dtype u8 | ndim u8 | reserved u8 | ndim x u32 dims | data

with dtype 1 = float32, 2 = float16. :func:`decode` checks every field and the
exact data length before it builds a tensor.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch
from torch import Tensor

MAGIC = b"NMOE"
VERSION = 1
DTYPES = {1: np.float32, 2: np.float16}
CODES = {np.dtype(np.float32): 1, np.dtype(np.float16): 2}
NAMES = {"fp32": torch.float32, "fp16": torch.float16}
_HEAD = struct.Struct("<4sBBBB")


class WireError(ValueError):
    """A message that is not a valid tensor encoding (the text says why)."""


def encode(t: Tensor) -> bytes:
    """Header + raw bytes of a float32/float16 tensor."""
    a = t.detach().cpu().contiguous().numpy()
    if a.dtype not in CODES:
        raise WireError(f"dtype {a.dtype} cannot be sent; use float32 or float16")
    return _HEAD.pack(MAGIC, VERSION, CODES[a.dtype], a.ndim, 0) + struct.pack(f"<{a.ndim}I", *a.shape) + a.astype(a.dtype.newbyteorder("<")).tobytes()


def decode(data: bytes, max_bytes: int | None = None) -> Tensor:
    """Tensor of a message made by :func:`encode`.

    Raises
    ------
    WireError
        Bad magic/version/dtype, truncated header, or a data length that
        does not match the header's shape; or more than ``max_bytes``.
    """
    if max_bytes is not None and len(data) > max_bytes:
        raise WireError(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    if len(data) < _HEAD.size:
        raise WireError("message shorter than the header")
    magic, version, code, ndim, _ = _HEAD.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise WireError(f"not an nmoe tensor message (magic {magic!r}, version {version})")
    if code not in DTYPES:
        raise WireError(f"unknown dtype code {code}; allowed: 1 (float32), 2 (float16)")
    if not 1 <= ndim <= 4:
        raise WireError(f"ndim {ndim} not in 1..4")
    offset = _HEAD.size + 4 * ndim
    if len(data) < offset:
        raise WireError("truncated shape header")
    shape = struct.unpack_from(f"<{ndim}I", data, _HEAD.size)
    if 0 in shape:
        raise WireError(f"shape {tuple(shape)} has an empty dimension")
    dtype = np.dtype(DTYPES[code]).newbyteorder("<")
    # Python ints: numpy's int64 product of e.g. 65536^4 wraps to 0 and would "match" an empty body.
    expected = math.prod(shape) * dtype.itemsize
    if len(data) - offset != expected:
        raise WireError(f"data is {len(data) - offset} bytes, shape {tuple(shape)} needs {expected}")
    array = np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)
    return torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True))
