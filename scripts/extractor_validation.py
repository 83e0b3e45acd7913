"""Judge a stage-1 extractor on held-out training data, without Flower and without the test sets.

Pools every client's labelled training images (the partition of the run
config), holds out ``--val-share`` of them, trains the pooled kNN, linear
and MLP probes (``algorithms.probes.probe_features``) on the rest and scores
them on the held-out part (pooled accuracy, class-balanced macro-F1). The
features are one of

- ``--features fedce`` (default): FedCE trained here in one plain process
  (``cli.plain_fedce.fedce_plain``, the ClientApp's code; any FedCE key can
  be overridden, e.g. ``fedce-logit-adjust=1.0``);
- ``--features saved --extractor <run>/extractor.pt``: a saved extractor;
- ``--features raw-pixels`` or ``random-init``: the floors.

    python scripts/extractor_validation.py --preset configs/paper.toml fedce-logit-adjust=1.0 --save outputs/fedce-la
    python scripts/extractor_validation.py --preset configs/paper.toml --features raw-pixels

Prints one JSON line. Stage-1 defaults are chosen on this table, never on
the pooled probe of results.json, which scores the test sets.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from nmoe_flwr.algorithms.experts import compute_latents
from nmoe_flwr.algorithms.fedce import new_classifier
from nmoe_flwr.algorithms.probes import probe_features
from nmoe_flwr.algorithms.seeding import derive_seed, generator
from nmoe_flwr.algorithms.training import (
    mean_over_clients,
    resolve_runtime,
    set_torch_threads,
)
from nmoe_flwr.cli.plain_fedce import config_from, fedce_plain
from nmoe_flwr.constants import EXTRACTOR_PREFIX, HEAD_PREFIX
from nmoe_flwr.data import all_client_splits, pixel_stats_for
from nmoe_flwr.pipelines.extractor import EXTRACTOR_FILE, HEAD_FILE, load_extractor
from nmoe_flwr.records import strip_prefix
from nmoe_flwr.workspace import cache_dir

KEPT = ("knn-pooled-accuracy", "linear-pooled-accuracy", "mlp-pooled-accuracy",
        "knn-balanced-macro-f1", "linear-balanced-macro-f1", "mlp-balanced-macro-f1")


def main(argv: list[str] | None = None) -> int:
    """Build the features, probe them on the held-out split, print the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", help="run-config TOML (e.g. configs/paper.toml)")
    parser.add_argument("--features", choices=("fedce", "saved", "raw-pixels", "random-init"), default="fedce")
    parser.add_argument("--extractor", help="a saved extractor.pt (with --features saved)")
    parser.add_argument("--save", type=Path, help="folder for the FedCE extractor.pt and head.pt (what extractor-checkpoint reads)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--val-share", type=float, default=0.2)
    parser.add_argument("overrides", nargs="*", help="key=value run-config overrides (TOML values)")
    args = parser.parse_args(argv)
    if (args.features == "saved") != bool(args.extractor):
        parser.error("--extractor goes with --features saved, and only with it")
    cfg = config_from(args.preset, args.overrides)
    set_torch_threads(args.threads)
    runtime = resolve_runtime(cfg.device, "off", cfg.channels_last)
    t0 = time.perf_counter()
    splits = all_client_splits(cfg, cache_dir(cfg.output_dir))
    images = torch.cat([s.train.images for s in splits])
    labels = torch.cat([s.train.labels for s in splits]).to(runtime.device)
    num_classes = splits[0].train.num_classes
    stats = pixel_stats_for(cfg.dataset, cfg.hf_dataset, images.shape[1])
    model = new_classifier(stats, num_classes, cfg.mlp_hidden, derive_seed(cfg.seed, "fedce-init"), cfg.extractor_norm)
    summary: dict = {"features": args.features, "overrides": args.overrides}
    if args.features == "fedce":
        state, metrics = fedce_plain(
            cfg, splits, runtime, on_round=lambda r, s: print(f"round {r}/{cfg.fedce_rounds}: {s:.1f} s", file=sys.stderr, flush=True)
        )
        model.load_state_dict(state)
        summary["fedce-classifier-test"] = mean_over_clients(dict(enumerate(metrics)))
        if args.save:
            args.save.mkdir(parents=True, exist_ok=True)
            torch.save(strip_prefix(state, EXTRACTOR_PREFIX), args.save / EXTRACTOR_FILE)
            torch.save(strip_prefix(state, HEAD_PREFIX), args.save / HEAD_FILE)
    elif args.features == "saved":
        model.extractor.load_state_dict(load_extractor(args.extractor, cfg.extractor_norm))
    if args.features == "raw-pixels":
        features = images.flatten(1).float().to(runtime.device) / 255.0
    else:
        features = compute_latents(runtime.prepare(model.extractor), images.to(runtime.device), cfg.batch_size * 4, runtime)
    order = torch.randperm(labels.numel(), generator=generator(derive_seed(cfg.seed, "extractor-val"))).to(runtime.device)
    held, rest = order[: int(args.val_share * labels.numel())], order[int(args.val_share * labels.numel()):]
    probes = probe_features(features[rest], labels[rest], features[held], labels[held], num_classes, runtime,
                            k=cfg.knn_k, seed=derive_seed(cfg.seed, "probe"))
    summary["val"] = {k: round(probes[k], 4) for k in KEPT}
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
