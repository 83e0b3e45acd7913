"""Serverless inference: wire format, expert-server processes on 127.0.0.1, the router."""

import datetime
import signal
import struct
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nmoe_flwr.algorithms.models import MLP, Gate, ResNet20, nmoe_combine, route
from nmoe_flwr.data.registry import PixelStats
from nmoe_flwr.inference.checkpoint import load_checkpoint, write_checkpoint
from nmoe_flwr.inference.router import GrpcTransport, InProcessTransport, Router
from nmoe_flwr.inference.server import PREDICT
from nmoe_flwr.inference.wire import WireError, decode, encode

TOKEN = "s3cret-deployment-token"
N = 4  # experts / devices


def test_wire_round_trip_and_rejections():
    t = torch.randn(3, 5)
    assert torch.equal(decode(encode(t)), t)
    half = torch.randn(2, 4).half()
    assert decode(encode(half)).dtype == torch.float16
    with pytest.raises(WireError, match="dtype"):
        encode(torch.ones(2, dtype=torch.int64))
    good = encode(t)
    for bad, why in [
        (b"XXXX" + good[4:], "magic"),
        (good[:10], "truncated|shorter"),
        (good[:-4], "needs"),
        (good[:5] + bytes([9]) + good[6:], "dtype code"),
        # 65536^4 elements: an int64 product wraps to 0 and matched an empty body (issue 12).
        (b"NMOE" + struct.pack("<BBBB", 1, 1, 4, 0) + struct.pack("<4I", 65536, 65536, 65536, 65536), "needs"),
        (b"NMOE" + struct.pack("<BBBB", 1, 1, 2, 0) + struct.pack("<2I", 0, 64), "empty dimension"),
    ]:
        with pytest.raises(WireError, match=why):
            decode(bad)
    with pytest.raises(WireError, match="exceeds"):
        decode(good, max_bytes=10)


def _models(seed):
    torch.manual_seed(seed)
    return ResNet20(PixelStats.neutral(1)), Gate(64, 16, N), MLP(64, 16, 10)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    folders = []
    for pid in range(N):
        extractor, gate, expert = _models(pid)
        folders.append(write_checkpoint(
            root / f"client-{pid}",
            {"extractor": extractor.state_dict(), "gate": gate.state_dict(), "expert": expert.state_dict()},
            {"partition-id": pid, "num-experts": N, "in-channels": 1, "pixel-mean": [0.5], "pixel-std": [0.25], "num-classes": 10, "latent-dim": 64,
             "mlp-hidden": 16, "top-k": 1},
        ))
    return folders


def _start(args, procs):
    proc = subprocess.Popen(
        [sys.executable, "-m", "nmoe_flwr.cli.inference", "serve-expert", *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    procs.append(proc)
    line = proc.stdout.readline()
    assert line.startswith("serving expert"), proc.stderr.read()
    return line.split()[-1]


@pytest.fixture(scope="module")
def servers(checkpoints, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("tok") / "token"
    token_file.write_text(TOKEN)
    procs: list[subprocess.Popen] = []
    try:
        addresses = {
            pid: _start(["--checkpoint", checkpoints[pid], "--port", 0, "--token-file", token_file, "--max-batch", 512], procs)
            for pid in range(1, N)
        }
        yield addresses, procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _router(checkpoints, transport, k=1):
    own = load_checkpoint(checkpoints[0])
    return Router(own.gate, 0, own.expert, transport, extractor=own.extractor, k=k, timeout=5.0)


@pytest.mark.parametrize("k", [1, 2])
def test_grpc_routing_equals_in_process(checkpoints, servers, k):
    addresses, _ = servers
    experts = {pid: load_checkpoint(checkpoints[pid]).expert for pid in range(N)}
    x = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8)
    transport = GrpcTransport(addresses, token=TOKEN)
    remote = _router(checkpoints, transport, k).classify(x)
    local = _router(checkpoints, InProcessTransport(experts), k).classify(x)
    transport.close()
    assert torch.allclose(remote.probs, local.probs, atol=1e-6)
    assert torch.equal(remote.experts, local.experts) and remote.rerouted == 0
    own = load_checkpoint(checkpoints[0])
    h = own.extractor(x.float())
    w, idx = route(own.gate(h), k)
    assert torch.allclose(local.probs, nmoe_combine(h, w, idx, [experts[j] for j in range(N)]), atol=1e-6)
    if (remote.experts != 0).any():
        assert remote.bytes_sent > 0


def _channel_call(address):
    channel = grpc.insecure_channel(address)
    return channel, channel.unary_unary(PREDICT)


@pytest.mark.parametrize(
    ("payload", "metadata", "code"),
    [
        (lambda: encode(torch.zeros(2, 64)), None, grpc.StatusCode.UNAUTHENTICATED),
        (lambda: encode(torch.zeros(2, 64)), (("authorization", "Bearer wrong"),), grpc.StatusCode.UNAUTHENTICATED),
        (lambda: b"\x00" * 40, (("authorization", f"Bearer {TOKEN}"),), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: encode(torch.zeros(2, 63)), (("authorization", f"Bearer {TOKEN}"),), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: encode(torch.zeros(2, 8, 8)), (("authorization", f"Bearer {TOKEN}"),), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: encode(torch.zeros(513, 64)), (("authorization", f"Bearer {TOKEN}"),), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (lambda: b"NMOE" + struct.pack("<BBBB", 1, 7, 2, 0) + struct.pack("<II", 1, 64) + bytes(256),
         (("authorization", f"Bearer {TOKEN}"),), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: b"x" * (17 * 1024 * 1024), (("authorization", f"Bearer {TOKEN}"),), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (lambda: b"NMOE" + struct.pack("<BBBB", 1, 1, 4, 0) + struct.pack("<4I", *(4 * (65536,))),
         (("authorization", f"Bearer {TOKEN}"),), grpc.StatusCode.INVALID_ARGUMENT),
    ],
    ids=["no-token", "wrong-token", "garbage", "wrong-dim", "wrong-ndim", "oversize-batch", "wrong-dtype", "oversize-message",
         "overflowing-shape"],
)
def test_malformed_requests_are_rejected_and_the_server_keeps_serving(servers, payload, metadata, code):
    addresses, _ = servers
    channel, call = _channel_call(addresses[1])
    with pytest.raises(grpc.RpcError) as info:
        call(payload(), timeout=10, metadata=metadata)
    assert info.value.code() == code
    good = call(encode(torch.zeros(3, 64)), timeout=10, metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert decode(good).shape == (3, 10)
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="nmoe.Expert"), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    channel.close()


def test_killing_a_server_mid_run_reroutes_and_loses_no_sample(checkpoints, servers):
    addresses, procs = servers
    transport = GrpcTransport(addresses, token=TOKEN)
    router = _router(checkpoints, transport, k=1)
    # Force traffic to every neighbour: route by a gate that prefers each expert in turn.
    x = torch.randint(0, 256, (256, 1, 28, 28), dtype=torch.uint8)
    first = router.classify(x[:128])
    victim = next(j for j in range(1, N) if (first.experts == j).any()) if (first.experts != 0).any() else 1
    victim_proc = procs[victim - 1]
    victim_proc.send_signal(signal.SIGKILL)
    victim_proc.wait(10)
    router.gate.decision.bias.data[victim] += 100.0  # every sample now wants the dead expert
    second = router.classify(x[128:])
    transport.close()
    router.close()
    assert second.probs.shape == (128, 10) and torch.allclose(second.probs.sum(1), torch.ones(128))
    assert second.rerouted == 128 and not (second.experts == victim).any()


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "server.pem", tmp / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_server_answers_tls_clients_only(checkpoints, tmp_path):
    cert, key = _self_signed(tmp_path)
    procs: list[subprocess.Popen] = []
    try:
        address = _start(["--checkpoint", checkpoints[1], "--port", 0, "--tls-cert", cert, "--tls-key", key], procs)
        transport = GrpcTransport({1: address}, root_cert=cert, server_name="localhost", dtype="fp16")
        logits, sent, _ = transport.predict(1, torch.randn(4, 64), timeout=10)
        assert logits.shape == (4, 10) and sent == len(encode(torch.zeros(4, 64).half()))
        transport.close()
        channel, call = _channel_call(address)  # plaintext client against a TLS server
        with pytest.raises(grpc.RpcError) as info:
            call(encode(torch.zeros(2, 64)), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        channel.close()
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
