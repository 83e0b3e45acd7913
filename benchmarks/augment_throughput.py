"""Is augmentation a bottleneck of FedSC's local training? Measured in one run.

For each input shape, on the same device and threads: the time to make two
augmented views of a batch (:func:`nmoe_flwr.data.augment.two_views`) and the
time of one FedSC training step on those views (extractor + projector,
forward and backward). Prints augmentation time / training time per batch;
below 0.2 means augmentation costs less than a fifth of the compute.

    python benchmarks/augment_throughput.py [--device cpu|cuda] [--batch 256]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nmoe_flwr.algorithms.fedsc import SSLModel, spectral_loss
from nmoe_flwr.data.augment import two_views
from nmoe_flwr.data.registry import PixelStats


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> int:
    """Measure both costs for Fashion-MNIST- and CIFAR-shaped batches."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    for channels, size in ((1, 28), (3, 32)):
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randint(0, 256, (args.batch, channels, size, size), dtype=torch.uint8, device=device)
        torch.manual_seed(0)
        model = SSLModel(PixelStats.neutral(channels), 128).to(device).to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        views = two_views(x, g)

        def train_step(model=model, views=views, opt=opt) -> None:  # bound now: called within this iteration
            z0 = model(views[0].contiguous(memory_format=torch.channels_last))
            z1 = model(views[1].contiguous(memory_format=torch.channels_last))
            loss = spectral_loss(z0, z1, 1.0, None, 4.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        t_aug = timed(lambda x=x, g=g: two_views(x, g), device, args.repeats)
        t_train = timed(train_step, device, args.repeats)
        rows.append({
            "input": f"{channels}x{size}x{size}", "batch": args.batch, "device": str(device),
            "augment-images-per-s": round(args.batch / t_aug), "train-images-per-s": round(args.batch / t_train),
            "augment/train-time": round(t_aug / t_train, 4),
        })
        print(f"{rows[-1]['input']}: augment {rows[-1]['augment-images-per-s']} img/s, "
              f"train {rows[-1]['train-images-per-s']} img/s, ratio {rows[-1]['augment/train-time']:.4f}", flush=True)
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
