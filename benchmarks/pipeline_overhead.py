"""Overhead of running stage 1 (FedCE) under ``flwr run`` versus one plain process.

Measured in one run, on one machine:

1. the machine's fp32 matmul peak (GFLOP/s, all cores);
2. ``python -m nmoe_flwr.cli.plain_fedce`` -- the same clients, rounds and local
   training in one process, start-up and data loading included;
3. ``nmoe-run`` (``flwr run`` in local simulation, ``stages = "fe"``, no
   baselines) -- SuperLink, Ray and ClientApp start-up included, until the
   run has finished (the SuperLink/Ray teardown after it is reported apart).

Prints the wall-time ratio (3) / (2), the ServerApp's own stage timings (to
see where the difference goes) and the extractor's training speed as a share
of the matmul peak. That reference is the measured sgemm throughput of this
machine, not its theoretical peak, and training FLOPs are counted as 3x the
forward FLOPs of conv/linear layers, so convolutions can exceed 100 %. Example (paper preset, fewer rounds)::

    python benchmarks/pipeline_overhead.py --preset configs/paper.toml --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nmoe_flwr.algorithms.models import Classifier
from nmoe_flwr.cli.run import launch
from nmoe_flwr.data.registry import PixelStats


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    """Best-of-``repeats`` fp32 GEMM throughput with the current torch threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def training_gflop_per_image(in_channels: int, size: int, num_classes: int = 10) -> float:
    """Training cost of one image: 3x the forward FLOPs of conv and linear layers
    (forward + two backward matmuls), counted with forward hooks."""
    model = Classifier(PixelStats.neutral(in_channels), num_classes, 128)
    flops = 0

    def count(module, inputs, output):
        nonlocal flops
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            flops += 2 * k * output.numel()
        elif isinstance(module, torch.nn.Linear):
            flops += 2 * module.in_features * output.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, in_channels, size, size))
    for h in hooks:
        h.remove()
    return 3 * flops / 1e9


def main() -> int:
    """Run both paths and print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=str(ROOT / "configs" / "paper.toml"))
    parser.add_argument("--rounds", type=int, default=5, help="FedCE rounds for both paths")
    parser.add_argument("--out", type=Path, help="write the JSON summary here too")
    args = parser.parse_args()

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    peak = matmul_peak_gflops()
    print(f"fp32 matmul peak: {peak:.1f} GFLOP/s ({threads} threads)", flush=True)

    common = [f"fedce-rounds={args.rounds}", 'stages="fe"', "local-baseline=false", "centralized-baseline=false"]
    with tempfile.TemporaryDirectory(prefix="nmoe-bench-") as tmp:
        # Each path gets its own empty output root, so both pay for decoding the data once.
        t0 = time.perf_counter()
        plain = subprocess.run(
            [sys.executable, "-m", "nmoe_flwr.cli.plain_fedce", "--preset", args.preset, *common],
            cwd=ROOT, env={**os.environ, "NMOE_OUTPUT_DIR": str(Path(tmp) / "plain")},
            capture_output=True, text=True, check=True,
        )
        plain_wall = time.perf_counter() - t0
        plain_summary = json.loads(plain.stdout.strip().splitlines()[-1])
        print(f"plain process: {plain_wall:.1f} s wall, {plain_summary['images-per-second']:.0f} img/s training", flush=True)

        t0 = time.perf_counter()
        status, record = _launch_flwr(args.preset, common, Path(tmp))
        flwr_total = time.perf_counter() - t0
        if status != "finished:completed":
            print(f"flwr run did not complete: {record}", flush=True)
            return 1
        flwr_wall = record["seconds-until-finished"]
        flwr_timings = json.loads(next((Path(tmp) / "flwr-out").glob("*/results.json")).read_text())["timings-s"]

    size, channels = (28, 1) if "cifar" not in Path(args.preset).read_text() else (32, 3)
    gflop = training_gflop_per_image(channels, size)
    share = plain_summary["images-per-second"] * gflop / peak
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {threads} cores, torch {torch.__version__}",
        "preset": Path(args.preset).name, "rounds": args.rounds,
        "matmul-peak-gflops": round(peak, 1),
        "plain-wall-s": round(plain_wall, 1), "plain-train-s": round(plain_summary["train-seconds"], 1),
        "flwr-wall-s": round(flwr_wall, 1), "flwr-wall-incl-teardown-s": round(flwr_total, 1),
        "flwr-stage1-s": flwr_timings.get("stage1-fedce"), "flwr-serverapp-s": flwr_timings.get("total"),
        "overhead-ratio": round(flwr_wall / plain_wall, 3),
        "train-gflop-per-image": round(gflop, 4),
        "train-images-per-s": round(plain_summary["images-per-second"], 1),
        "share-of-matmul-peak": round(share, 3),
    }
    print(json.dumps(summary, indent=2))
    print(f"\nflwr run / plain process wall time: {summary['overhead-ratio']:.3f}")
    print(f"extractor training speed: {100 * share:.0f} % of the fp32 matmul peak")
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))
    return 0


def _launch_flwr(preset: str, overrides: list[str], tmp: Path) -> tuple[str, dict]:
    """The preset plus overrides through nmoe-run (``flwr run`` in local simulation)."""
    return launch(
        ROOT, preset, flwr_home=tmp / "flwr", log_file=tmp / "flwr.log",
        extra_env={"NMOE_OUTPUT_DIR": str(tmp / "flwr-out")}, overrides=[" ".join(overrides)],
    )


if __name__ == "__main__":
    raise SystemExit(main())
