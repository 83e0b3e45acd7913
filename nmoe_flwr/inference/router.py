"""The NMoE router: a device's extractor + gate, and its neighbours' experts.

For a batch, the router computes latents, lets the gate pick the top-k
experts per sample, groups the samples by expert and sends each group in one
request (concurrently), then mixes the answers with the gate weights:
``y = sum_j w_j softmax(H_j(h))`` -- the same computation as
:func:`nmoe_flwr.models.nmoe_combine`.

When a neighbour fails or does not answer within ``timeout``, its samples go
to their next-best expert that is still reachable (and not already picked
for that sample); the device's own expert runs locally and is always
reachable, so no sample is lost. The number of rerouted samples is reported.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
import torch
from torch import Tensor, nn

from ..algorithms.models import route
from .server import PREDICT
from .wire import NAMES, decode, encode


class TransportError(RuntimeError):
    """A neighbour's expert could not answer (down, slow, refused)."""


class Transport(Protocol):
    """Sends latents to expert ``expert_id`` and returns its logits."""

    def predict(self, expert_id: int, h: Tensor, timeout: float) -> tuple[Tensor, int, int]:
        """``(logits, bytes sent, bytes received)``; raises :class:`TransportError`."""
        ...


class InProcessTransport:
    """Experts called in this process; counts the bytes the wire messages would take."""

    def __init__(self, experts: Mapping[int, nn.Module], dtype: str = "fp32") -> None:
        self.experts, self.dtype = experts, NAMES[dtype]

    def predict(self, expert_id: int, h: Tensor, timeout: float) -> tuple[Tensor, int, int]:
        if expert_id not in self.experts:
            raise TransportError(f"no expert {expert_id}")
        request = h.to(self.dtype)
        with torch.no_grad():
            logits = self.experts[expert_id](request.float()).to(self.dtype)
        return logits.float(), len(encode(request)), len(encode(logits))


class GrpcTransport:
    """Experts behind ``nmoe serve-expert`` servers.

    Parameters
    ----------
    addresses : expert id -> ``host:port``
    token : shared deployment token (sent as ``authorization: Bearer <token>``)
    root_cert : PEM file of the CA that signed the servers' certificates (TLS on)
    dtype : ``"fp32"`` or ``"fp16"`` latents on the wire (fp16 halves the bytes)
    """

    def __init__(
        self,
        addresses: Mapping[int, str],
        token: str | None = None,
        root_cert: Path | None = None,
        dtype: str = "fp32",
        server_name: str | None = None,
    ) -> None:
        self.dtype = NAMES[dtype]
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        options = [("grpc.max_receive_message_length", 64 * 1024 * 1024), ("grpc.max_send_message_length", 64 * 1024 * 1024)]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        creds = grpc.ssl_channel_credentials(root_cert.read_bytes()) if root_cert else None
        self.channels = {
            j: grpc.secure_channel(a, creds, options) if creds else grpc.insecure_channel(a, options)
            for j, a in addresses.items()
        }
        self.calls = {j: c.unary_unary(PREDICT) for j, c in self.channels.items()}

    def predict(self, expert_id: int, h: Tensor, timeout: float) -> tuple[Tensor, int, int]:
        if expert_id not in self.calls:
            raise TransportError(f"no address for expert {expert_id}")
        request = encode(h.to(self.dtype))
        try:
            reply = self.calls[expert_id](request, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise TransportError(f"expert {expert_id}: {exc.code().name}: {exc.details()}") from exc
        return decode(reply).float(), len(request), len(reply)

    def close(self) -> None:
        """Close every channel."""
        for channel in self.channels.values():
            channel.close()


@dataclass(frozen=True)
class RoutedBatch:
    """What :meth:`Router.classify` returns for one batch."""

    probs: Tensor  # (B, C) mixture class probabilities
    experts: Tensor  # (B, k) experts that answered, best first
    rerouted: int  # samples with at least one slot moved to a fallback expert
    bytes_sent: int
    bytes_received: int
    seconds: float


class Router:
    """Classify batches on one device with the experts of the whole network.

    Parameters
    ----------
    gate : the device's gate
    own_id, own_expert : this device's expert (always run locally; ``None`` if
        it has none, e.g. lost in training: asking it then falls back like an unreachable neighbour)
    transport : how to reach the other experts
    extractor : ``F``; optional when the caller passes latents
    k : experts per sample
    timeout : seconds per request before falling back
    """

    def __init__(
        self,
        gate: nn.Module,
        own_id: int,
        own_expert: nn.Module | None,
        transport: Transport,
        extractor: nn.Module | None = None,
        k: int = 1,
        timeout: float = 2.0,
    ) -> None:
        self.gate, self.own_id = gate.eval(), own_id
        self.own_expert = own_expert.eval() if own_expert is not None else None
        self.transport, self.extractor, self.k, self.timeout = transport, extractor, k, timeout
        self.pool = ThreadPoolExecutor(max_workers=16)

    @torch.no_grad()
    def classify(self, x: Tensor) -> RoutedBatch:
        """Images -> latents -> routed prediction."""
        if self.extractor is None:
            raise ValueError("this router has no extractor; use classify_latents")
        return self.classify_latents(self.extractor.eval()(x))

    @torch.no_grad()
    def classify_latents(self, h: Tensor) -> RoutedBatch:
        """Route latents ``(B, d)`` to the top-k experts, with fallbacks."""
        t0 = time.perf_counter()
        scores = self.gate(h)
        index = route(scores, self.k)[1].clone()
        ranking = scores.argsort(dim=1, descending=True)
        n = h.shape[0]
        down: set[int] = set()
        have: dict[int, Tensor] = {}  # expert -> (B,) rows it has answered
        logits: dict[int, Tensor] = {}  # expert -> (B, C) its answers (valid where have)
        moved = torch.zeros(n, dtype=torch.bool)
        sent = received = 0
        while True:
            need = {}
            for j in index.unique().tolist():
                rows = ((index == j).any(dim=1) & ~have.get(j, torch.zeros(n, dtype=torch.bool))).nonzero(as_tuple=True)[0]
                if rows.numel():
                    need[j] = rows
            if not need:
                break
            futures = {j: self.pool.submit(self._ask, j, h, rows) for j, rows in need.items()}
            for j, future in futures.items():
                rows = need[j]
                try:
                    answer, s, r = future.result()
                except TransportError:
                    down.add(j)
                    for row in rows.tolist():  # next-best reachable expert for every slot j held
                        for slot in (index[row] == j).nonzero(as_tuple=True)[0].tolist():
                            taken = set(index[row].tolist())
                            index[row, slot] = next(e for e in ranking[row].tolist() if e not in down and e not in taken)
                        moved[row] = True
                    continue
                if j not in logits:
                    logits[j] = torch.zeros(n, answer.shape[1])
                    have[j] = torch.zeros(n, dtype=torch.bool)
                logits[j][rows] = answer
                have[j][rows] = True
                sent, received = sent + s, received + r
        weights = scores.gather(1, index).softmax(dim=1)  # top-k among the experts that answered
        probs = torch.zeros(n, next(iter(logits.values())).shape[1])
        for slot in range(index.shape[1]):
            for j in index[:, slot].unique().tolist():
                hit = (index[:, slot] == j).nonzero(as_tuple=True)[0]
                probs[hit] += weights[hit, slot, None] * logits[j][hit].softmax(-1)
        return RoutedBatch(probs, index, int(moved.sum()), sent, received, time.perf_counter() - t0)

    def _ask(self, j: int, h: Tensor, rows: Tensor) -> tuple[Tensor, int, int]:
        if j == self.own_id:
            if self.own_expert is None:
                raise TransportError(f"device {j} has no expert")
            with torch.no_grad():
                return self.own_expert(h[rows]).float(), 0, 0
        logits, sent, received = self.transport.predict(j, h[rows], self.timeout)
        if logits.shape[0] != rows.shape[0]:
            raise TransportError(f"expert {j} answered {logits.shape[0]} rows for {rows.shape[0]}")
        return logits, sent, received

    def close(self) -> None:
        """Stop the request threads."""
        self.pool.shutdown(wait=False)
