"""Expert server: one device serves its expert over gRPC.

``/nmoe.Expert/Predict``: a batch of latents in (:mod:`~nmoe_flwr.inference.wire`
encoding, float32 or float16), the expert's logits out, in the request's
dtype. Methods carry raw bytes (generic handlers, no generated code, nothing
unpickled). Every request is validated; a bad one gets a gRPC error status
and the server keeps serving:

- ``UNAUTHENTICATED``: missing or wrong shared token (metadata
  ``authorization: Bearer <token>``) when the server has one;
- ``INVALID_ARGUMENT``: not a tensor message, wrong dtype, not ``(B, d)``,
  or ``d`` different from the expert's input size;
- ``RESOURCE_EXHAUSTED``: more than ``max_batch`` rows (messages over
  ``max_message_bytes`` are refused by gRPC itself with the same status).

The standard ``grpc.health.v1.Health`` service reports ``SERVING``. TLS is on
when a certificate and key are given.
"""

from __future__ import annotations

import hmac
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from torch import nn

from .wire import WireError, decode, encode

SERVICE = "nmoe.Expert"
PREDICT = f"/{SERVICE}/Predict"
INFO = f"/{SERVICE}/Info"


@dataclass(frozen=True)
class ServerLimits:
    """Request limits of an expert server."""

    max_batch: int = 8192
    max_message_bytes: int = 16 * 1024 * 1024


class ExpertService:
    """The request handling of one expert (transport-independent, testable)."""

    def __init__(self, expert: nn.Module, in_dim: int, expert_id: int, limits: ServerLimits, token: str | None) -> None:
        self.expert, self.in_dim, self.expert_id = expert.eval(), in_dim, expert_id
        self.limits, self.token = limits, token
        self.lock = threading.Lock()  # torch modules are not re-entrant across threads for free
        self.served = 0

    def _check_token(self, context: grpc.ServicerContext) -> None:
        if self.token is None:
            return
        given = dict(context.invocation_metadata()).get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")

    def predict(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Validate a batch of latents and return the expert's logits."""
        self._check_token(context)
        try:
            h = decode(request, self.limits.max_message_bytes)
        except WireError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if h.dim() != 2 or h.shape[1] != self.in_dim:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"latents must be (B, {self.in_dim}), got {tuple(h.shape)}")
        if h.shape[0] > self.limits.max_batch:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"batch of {h.shape[0]} exceeds max {self.limits.max_batch}")
        if not torch.isfinite(h).all():
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "latents contain NaN or inf")
        with self.lock, torch.no_grad():
            logits = self.expert(h.float())
            self.served += h.shape[0]
        return encode(logits.to(h.dtype))

    def info(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Expert id and input size, as ``"<id> <in_dim>"`` (ASCII)."""
        self._check_token(context)
        return f"{self.expert_id} {self.in_dim}".encode()


def _raw(fn: Callable[[bytes, grpc.ServicerContext], bytes]) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(fn)  # no (de)serializers: raw bytes both ways


def serve(
    expert: nn.Module,
    in_dim: int,
    expert_id: int,
    address: str,
    *,
    limits: ServerLimits = ServerLimits(),
    token: str | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    workers: int = 4,
) -> tuple[grpc.Server, int]:
    """Start an expert server on ``address`` (``host:port``, port 0 = any); returns it and its port."""
    service = ExpertService(expert, in_dim, expert_id, limits, token)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        options=[
            ("grpc.max_receive_message_length", limits.max_message_bytes),
            ("grpc.max_send_message_length", limits.max_message_bytes),
        ],
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"Predict": _raw(service.predict), "Info": _raw(service.info)}),)
    )
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if tls_cert is not None and tls_key is not None:
        creds = grpc.ssl_server_credentials([(tls_key.read_bytes(), tls_cert.read_bytes())])
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    server.start()
    return server, port
