"""Routed NMoE inference over loopback gRPC against local-only inference, in one run.

Same checkpoints, same data, same Router code:

- **local**: every expert in this process (``InProcessTransport``);
- **routed fp32 / fp16**: the neighbours' experts behind ``nmoe serve-expert``
  processes on 127.0.0.1, latents sent as float32 or float16.

Prints samples/s of each and the ratio routed / local, and the bytes sent
per sample for latents (fp32, fp16) against the raw input (uint8 and float32
images). Uses a run's checkpoints (``--checkpoints <run>/checkpoints``) or,
without one, writes random-weight checkpoints (throughput and bytes do not
depend on the weights; the share of samples routed away is printed).

    python benchmarks/inference_routing.py --checkpoints outputs/paper/checkpoints
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nmoe_flwr.algorithms.models import MLP, Gate, ResNet20
from nmoe_flwr.data.registry import PixelStats
from nmoe_flwr.inference.checkpoint import load_checkpoint, write_checkpoint
from nmoe_flwr.inference.router import GrpcTransport, InProcessTransport, Router


def random_checkpoints(folder: Path, n: int, channels: int = 1) -> list[Path]:
    """Random-weight checkpoints of ``n`` devices (for throughput and bytes only)."""
    out = []
    for pid in range(n):
        torch.manual_seed(pid)
        states = {"extractor": ResNet20(PixelStats.neutral(channels)).state_dict(), "gate": Gate(64, 128, n).state_dict(),
                  "expert": MLP(64, 128, 10).state_dict()}
        out.append(write_checkpoint(folder / f"client-{pid}", states, {
            "partition-id": pid, "num-experts": n, "in-channels": channels, "num-classes": 10, "pixel-mean": [0.5] * channels, "pixel-std": [0.25] * channels,
            "latent-dim": 64, "mlp-hidden": 128, "top-k": 1}))
    return out


def run(router: Router, x: torch.Tensor, batch: int) -> dict:
    """Classify ``x`` in batches; samples/s and bytes per sample."""
    router.classify(x[:batch])  # warm-up (connections, kernels)
    t0, sent, away = time.perf_counter(), 0, 0
    for start in range(0, x.shape[0], batch):
        out = router.classify(x[start : start + batch])
        sent += out.bytes_sent
        away += int((out.experts != router.own_id).any(dim=1).sum())
    wall = time.perf_counter() - t0
    return {"samples-per-s": x.shape[0] / wall, "bytes-sent-per-sample": sent / x.shape[0], "routed-away": away / x.shape[0]}


def main() -> int:
    """Start the expert servers, measure, stop them."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=Path, help="a run's checkpoints folder (client-<id> subfolders)")
    parser.add_argument("--devices", type=int, default=4, help="devices when no checkpoints are given")
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the servers take the other core(s)

    with tempfile.TemporaryDirectory() as tmp:
        folders = (sorted(args.checkpoints.glob("client-*"), key=lambda p: int(p.name.split("-")[1]))
                   if args.checkpoints else random_checkpoints(Path(tmp), args.devices))
        own = load_checkpoint(folders[0])
        experts = {load_checkpoint(f).partition_id: load_checkpoint(f).expert for f in folders}
        channels = int(own.manifest["in-channels"])
        size = 28 if channels == 1 else 32
        x = torch.randint(0, 256, (args.samples, channels, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        procs, addresses = [], {}
        try:
            for folder in folders[1:]:
                proc = subprocess.Popen([sys.executable, "-m", "nmoe_flwr.cli.inference", "serve-expert",
                                         "--checkpoint", str(folder), "--workers", "2"],
                                        stdout=subprocess.PIPE, text=True)
                procs.append(proc)
                line = proc.stdout.readline()
                addresses[int(line.split()[2])] = line.split()[-1]
            local = run(Router(own.gate, 0, own.expert, InProcessTransport(experts), extractor=own.extractor), x, args.batch)
            rows = {"local": local}
            for dtype in ("fp32", "fp16"):
                transport = GrpcTransport(addresses, dtype=dtype)
                rows[f"routed-{dtype}"] = run(Router(own.gate, 0, own.expert, transport, extractor=own.extractor), x, args.batch)
                transport.close()
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
                proc.wait(10)
    raw_u8, raw_f32 = channels * size * size, 4 * channels * size * size
    summary = {
        "devices": len(folders), "samples": args.samples, "batch": args.batch,
        "checkpoints": str(args.checkpoints) if args.checkpoints else "random weights",
        **{k: {m: round(v, 3) for m, v in r.items()} for k, r in rows.items()},
        "routed-fp32/local throughput": round(rows["routed-fp32"]["samples-per-s"] / local["samples-per-s"], 3),
        "routed-fp16/local throughput": round(rows["routed-fp16"]["samples-per-s"] / local["samples-per-s"], 3),
        "bytes per sample if sent": {"latent-fp32": 64 * 4, "latent-fp16": 64 * 2, "raw-uint8": raw_u8, "raw-fp32": raw_f32},
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
