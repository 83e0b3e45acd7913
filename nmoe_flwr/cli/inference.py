"""``nmoe``: serverless NMoE inference from a run's checkpoints.

    nmoe serve-expert --checkpoint outputs/smoke/checkpoints/client-1 --port 50051
    nmoe infer --checkpoint outputs/smoke/checkpoints/client-0 \\
        --neighbours "1=127.0.0.1:50051,2=127.0.0.1:50052,3=127.0.0.1:50053"

``serve-expert`` serves one device's expert until SIGINT/SIGTERM; its first
output line is ``serving expert <id> on <host>:<port>``. ``infer``
classifies the device's test set (``<run>/clients/<id>/data.pt`` by default)
through its gate and the network of experts, and prints accuracy, latency,
throughput, bytes and routing figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from ..algorithms.training import classification_metrics
from ..inference.checkpoint import load_checkpoint
from ..inference.router import GrpcTransport, Router
from ..inference.server import ServerLimits, serve

TOKEN_ENV = "NMOE_TOKEN"


def _token(path: Path | None) -> str | None:
    if path is not None:
        return path.read_text().strip()
    return os.environ.get(TOKEN_ENV) or None


def parse_neighbours(spec: str) -> dict[int, str]:
    """``"1=host:port,2=host:port"`` or a JSON file ``{"1": "host:port"}`` -> {expert id: address}."""
    path = Path(spec)
    if path.is_file():
        return {int(k): str(v) for k, v in json.loads(path.read_text()).items()}
    table = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        key, sep, address = entry.partition("=")
        if not sep or not key.strip().isdigit() or ":" not in address:
            raise argparse.ArgumentTypeError(f"neighbour {entry!r} must be '<expert id>=<host>:<port>'")
        table[int(key)] = address.strip()
    return table


def serve_expert(args: argparse.Namespace) -> int:
    """Run one expert server until SIGINT/SIGTERM."""
    ckpt = load_checkpoint(args.checkpoint)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SystemExit("--tls-cert and --tls-key go together")
    server, port = serve(
        ckpt.expert, int(ckpt.manifest["latent-dim"]), ckpt.partition_id, f"{args.host}:{args.port}",
        limits=ServerLimits(args.max_batch, int(args.max_message_mb * 1024 * 1024)),
        token=_token(args.token_file), tls_cert=args.tls_cert, tls_key=args.tls_key, workers=args.workers,
    )
    print(f"serving expert {ckpt.partition_id} on {args.host}:{port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=2.0).wait()
    return 0


def infer(args: argparse.Namespace) -> int:
    """Classify a data set through the network of experts; print the metrics."""
    torch.set_num_threads(args.threads or (os.cpu_count() or 1))
    ckpt = load_checkpoint(args.checkpoint)
    data_path = args.data or args.checkpoint.resolve().parents[1] / "clients" / str(ckpt.partition_id) / "data.pt"
    blob = torch.load(data_path, weights_only=True)
    x, y = blob["test_x"], blob["test_y"]
    transport = GrpcTransport(
        args.neighbours, token=_token(args.token_file), root_cert=args.tls_ca, dtype=args.dtype, server_name=args.server_name
    )
    router = Router(
        ckpt.gate, ckpt.partition_id, ckpt.expert, transport, extractor=ckpt.extractor,
        k=args.top_k or int(ckpt.manifest.get("top-k", 1)), timeout=args.timeout,
    )
    preds, latencies, experts = [], [], []
    sent = received = rerouted = 0
    t0 = time.perf_counter()
    try:
        for start in range(0, x.shape[0], args.batch_size):
            batch = router.classify(x[start : start + args.batch_size])
            preds.append(batch.probs.argmax(1))
            experts.append(batch.experts)
            latencies.append(batch.seconds)
            sent, received, rerouted = sent + batch.bytes_sent, received + batch.bytes_received, rerouted + batch.rerouted
    finally:
        router.close()
        transport.close()
    wall = time.perf_counter() - t0
    used = torch.cat(experts)
    metrics = {
        "partition-id": ckpt.partition_id,
        "samples": int(x.shape[0]),
        **classification_metrics(torch.cat(preds), y, int(ckpt.manifest["num-classes"])),
        "latency-ms-p50": 1e3 * float(np.percentile(latencies, 50)),
        "latency-ms-p99": 1e3 * float(np.percentile(latencies, 99)),
        "samples-per-s": x.shape[0] / wall,
        "bytes-sent-per-sample": sent / x.shape[0],
        "bytes-received-per-sample": received / x.shape[0],
        "routed-to-neighbour": float((used != ckpt.partition_id).any(dim=1).float().mean()),
        "samples-per-expert": {
            str(j): int((used == j).any(dim=1).sum()) for j in range(int(ckpt.manifest["num-experts"]))
        },
        "rerouted": rerouted,
        "wire-dtype": args.dtype,
    }
    print(json.dumps(metrics, indent=2), flush=True)
    if args.json:
        args.json.write_text(json.dumps(metrics, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``nmoe`` argument parser (every option documented in ``--help``)."""
    parser = argparse.ArgumentParser(prog="nmoe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve-expert", help="serve one device's expert over gRPC")
    s.add_argument("--checkpoint", type=Path, required=True, help="client checkpoint folder (<run>/checkpoints/client-<id>)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all interfaces)")
    s.add_argument("--port", type=int, default=0, help="port to bind (default 0: any free port, printed on start)")
    s.add_argument("--token-file", type=Path, help=f"file with the shared deployment token (or ${TOKEN_ENV}); requests without it are refused")
    s.add_argument("--tls-cert", type=Path, help="PEM certificate of this server (TLS on; needs --tls-key)")
    s.add_argument("--tls-key", type=Path, help="PEM private key of this server")
    s.add_argument("--max-batch", type=int, default=8192, help="largest batch of latents accepted (default 8192)")
    s.add_argument("--max-message-mb", type=float, default=16.0, help="largest request in MiB (default 16)")
    s.add_argument("--workers", type=int, default=4, help="request threads (default 4)")
    s.set_defaults(fn=serve_expert)

    i = sub.add_parser("infer", help="classify a device's data through the network of experts")
    i.add_argument("--checkpoint", type=Path, required=True, help="this device's checkpoint folder (extractor, gate, own expert)")
    i.add_argument("--neighbours", type=parse_neighbours, required=True,
                   help='expert id -> address: "1=host:port,2=host:port" or a JSON file {"1": "host:port"}')
    i.add_argument("--data", type=Path, help="data.pt with test_x/test_y (default: <run>/clients/<id>/data.pt)")
    i.add_argument("--batch-size", type=int, default=256, help="samples per routed batch (default 256)")
    i.add_argument("--top-k", type=int, default=0, help="experts per sample (default: the run's top-k)")
    i.add_argument("--timeout", type=float, default=2.0, help="seconds per request before falling back to the next-best expert")
    i.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="latents on the wire (fp16 halves the bytes)")
    i.add_argument("--token-file", type=Path, help=f"file with the shared deployment token (or ${TOKEN_ENV})")
    i.add_argument("--tls-ca", type=Path, help="PEM CA certificate that signed the servers' certificates (TLS on)")
    i.add_argument("--server-name", help="TLS name to expect in the servers' certificates (if not their host)")
    i.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    i.add_argument("--json", type=Path, help="also write the metrics here")
    i.set_defaults(fn=infer)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``nmoe``."""
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
