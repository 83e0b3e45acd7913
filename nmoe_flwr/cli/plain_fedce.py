"""``python -m nmoe_flwr.cli.plain_fedce``: stage 1 (FedCE) in one plain process, without Flower.

The reference that the overhead benchmark compares ``flwr run`` against, and
the path that runs on machines without ``flwr``/``ray`` (the lent GPU box).
Clients train one after another with exactly the ClientApp's code
(:func:`nmoe_flwr.algorithms.fedce.train_classifier`, same seeds); averaging
is FedAvg's weighted mean by example count. It imports nothing from Flower.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

import torch

from ..algorithms.fedce import (
    classifier_metrics,
    fedce_round_lr,
    new_classifier,
    train_classifier,
)
from ..algorithms.seeding import derive_seed
from ..algorithms.server_momentum import momentum_step
from ..algorithms.training import DeviceData, Runtime, mean_over_clients
from ..config import RunConfig
from ..constants import EXTRACTOR_PREFIX, HEAD_PREFIX
from ..data import ClientSplits, pixel_stats_for


def weighted_mean(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """FedAvg of state dicts: ``sum_i w_i s_i / sum_i w_i`` per entry (dtype kept)."""
    total = float(sum(weights))
    return {
        k: sum(s[k].double() * (w / total) for s, w in zip(states, weights)).to(states[0][k].dtype)
        for k in states[0]
    }


def fedce_plain(
    cfg: RunConfig,
    splits: Sequence[ClientSplits],
    runtime: Runtime,
    on_round: Callable[[int, float], None] | None = None,
) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    """Run ``fedce-rounds`` rounds of FedCE over ``splits`` sequentially.

    Returns the final averaged classifier state and, per client, the FedCE
    classifier's test metrics. ``on_round(round, seconds)`` reports progress.
    """
    in_channels, num_classes = splits[0].train.images.shape[1], splits[0].train.num_classes
    stats = pixel_stats_for(cfg.dataset, cfg.hf_dataset, in_channels)
    model = new_classifier(stats, num_classes, cfg.mlp_hidden, derive_seed(cfg.seed, "fedce-init"), cfg.extractor_norm)
    model = runtime.prepare(model)
    shared = (EXTRACTOR_PREFIX, HEAD_PREFIX) if cfg.fedce_average_head else (EXTRACTOR_PREFIX,)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    local_states = [dict(global_state) for _ in splits]
    data = [DeviceData.of(s.train, runtime) for s in splits]
    velocity: dict[str, torch.Tensor] | None = None  # FedAvgM; the first round is plain FedAvg
    for rnd in range(1, cfg.fedce_rounds + 1):
        t0 = time.perf_counter()
        states, weights = [], []
        for pid, client in enumerate(data):
            model.load_state_dict({**local_states[pid], **{k: v for k, v in global_state.items() if k.startswith(shared)}})
            fit = train_classifier(
                model, client, cfg, runtime, epochs=cfg.fedce_local_epochs,
                lr=fedce_round_lr(cfg.lr, rnd, cfg.fedce_rounds), seed=derive_seed(cfg.seed, pid, "fedce", rnd),
                logit_adjust=cfg.fedce_logit_adjust, prox_mu=cfg.fedce_prox_mu, shared_prefixes=shared,
            )
            local_states[pid] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            states.append(local_states[pid])
            weights.append(fit.num_examples)
        avg = weighted_mean(states, weights)
        if cfg.fedce_server_momentum > 0 and velocity is not None:
            shared_prev = {k: v for k, v in global_state.items() if k.startswith(shared)}
            moved = momentum_step(shared_prev, {k: avg[k] for k in shared_prev}, velocity, cfg.fedce_server_momentum)
            avg = {**avg, **moved}
        elif cfg.fedce_server_momentum > 0:
            velocity = {}
        global_state = avg
        if on_round is not None:
            on_round(rnd, time.perf_counter() - t0)
    metrics = []
    for pid, split in enumerate(splits):
        model.load_state_dict({**local_states[pid], **{k: v for k, v in global_state.items() if k.startswith(shared)}})
        test = DeviceData.of(split.test, runtime)
        metrics.append(classifier_metrics(model, test, num_classes, cfg.batch_size * 4, runtime))
    return global_state, metrics


def config_from(preset: str | None, overrides: list[str]) -> RunConfig:
    """Defaults of pyproject.toml (if found) + a preset TOML + ``key=value`` overrides.

    Deliberately not :func:`nmoe_flwr.cli.flwr_process.merged_run_config`, which uses
    flwr's parser: this path must run where ``flwr`` is not installed.
    """
    from pathlib import Path

    import tomllib

    from ..config import parse_run_config

    raw: dict = {}
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if pyproject.exists():
        raw.update(tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"])
    if preset:
        raw.update(tomllib.loads(Path(preset).read_text()))
    for item in overrides:
        key, _, value = item.partition("=")
        raw[key] = tomllib.loads(f"v = {value}")["v"] if value not in ("",) else value
    return parse_run_config(raw)


def main(argv: list[str] | None = None) -> int:
    """``python -m nmoe_flwr.cli.plain_fedce``: FedCE in one process; prints a JSON summary."""
    import argparse
    import json

    from ..algorithms.training import resolve_runtime, set_torch_threads
    from ..data import all_client_splits
    from ..workspace import cache_dir

    t0 = time.perf_counter()
    parser = argparse.ArgumentParser(prog="python -m nmoe_flwr.cli.plain_fedce", description=main.__doc__)
    parser.add_argument("--preset", help="run-config TOML (e.g. configs/paper.toml)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("overrides", nargs="*", help="key=value run-config overrides (TOML values)")
    args = parser.parse_args(argv)
    cfg = config_from(args.preset, args.overrides)
    threads = set_torch_threads(args.threads or (os.cpu_count() or 1))
    runtime = resolve_runtime(cfg.device, cfg.amp, cfg.channels_last)
    splits = all_client_splits(cfg, cache_dir(cfg.output_dir))
    train_s: list[float] = []
    _, metrics = fedce_plain(
        cfg, splits, runtime,
        on_round=lambda r, s: (train_s.append(s), print(f"round {r}/{cfg.fedce_rounds}: {s:.1f} s", flush=True)),
    )
    images = cfg.fedce_rounds * cfg.fedce_local_epochs * sum(len(s.train) for s in splits)
    summary = {
        "rounds": cfg.fedce_rounds, "clients": cfg.num_clients, "threads": threads, "device": str(runtime.device),
        "train-seconds": sum(train_s), "train-images": images, "images-per-second": images / sum(train_s),
        "wall-seconds": time.perf_counter() - t0,
        "fedce-classifier": mean_over_clients(dict(enumerate(metrics))),
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
