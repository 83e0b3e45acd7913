"""Pooled probes of the stage-1 extractor with their floors, and the router ceiling.

Computed by the server in its own process on all clients' data pooled (like
the centralized baseline: the data must be on the server's machine, true in
simulation; elsewhere the step is skipped and the reason recorded). Our
addition to the papers' protocol, so that every run says how good its
extractor is against raw pixels and a random-init ResNet20, and how far any
gate could get on its latents.
"""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO

import torch
from flwr.app import ArrayRecord
from flwr.supercore import log

from ..algorithms.experts import compute_latents
from ..algorithms.fedce import new_classifier
from ..algorithms.probes import probe_features, router_ceiling
from ..algorithms.seeding import derive_seed
from ..algorithms.training import (
    Runtime,
    mean_over_clients,
)
from ..constants import EXTRACTOR_PREFIX, IID_PREFIX
from ..data import ClientSplits, pixel_stats_for
from ..records import from_record, strip_prefix
from .baselines import clients_data_on_server
from .messaging import Federation
from .results import RunRecorder

Features = Callable[[torch.Tensor], torch.Tensor]


def feature_maps(fed: Federation, extractor: ArrayRecord, runtime: Runtime) -> dict[str, Features]:
    """``name -> images -> features`` for the probes: raw pixels (the floor
    without any network), the random-init ResNet20 stage 1 starts from, and
    the trained extractor."""
    cfg = fed.cfg
    stats = pixel_stats_for(cfg.dataset, cfg.hf_dataset, fed.in_channels)
    random_init = new_classifier(stats, fed.num_classes, cfg.mlp_hidden, derive_seed(cfg.seed, "fedce-init"), cfg.extractor_norm).extractor
    trained = new_classifier(stats, fed.num_classes, cfg.mlp_hidden, 0, cfg.extractor_norm).extractor
    trained.load_state_dict(strip_prefix(from_record(extractor), EXTRACTOR_PREFIX))
    bs = cfg.batch_size * 4

    def latents_of(model: torch.nn.Module) -> Features:
        model = runtime.prepare(model)
        return lambda x: compute_latents(model, x.to(runtime.device), bs, runtime)

    return {
        "raw-pixels": lambda x: x.flatten(1).float().to(runtime.device) / 255.0,
        "random-init": latents_of(random_init),
        "extractor": latents_of(trained),
    }


def pooled_probes(fed: Federation, rec: RunRecorder, extractor: ArrayRecord) -> None:
    """Record ``stages.pooled-probe`` (kNN, linear and MLP probes of raw pixels,
    random init and the extractor on pooled data) and the ``router-ceiling``
    result (per client)."""
    cfg = fed.cfg
    found = clients_data_on_server(fed, rec, "pooled-probe")
    if found is None:
        return
    splits, runtime = found
    train_x, train_y = pooled(splits, "train")
    test_x, test_y = pooled(splits, "test")
    train_y, test_y = train_y.to(runtime.device), test_y.to(runtime.device)
    table: dict[str, dict[str, float]] = {}
    for name, features in feature_maps(fed, extractor, runtime).items():
        train_h = features(train_x)  # computed once: the probes and the ceiling share it
        table[name] = probe_features(
            train_h, train_y, features(test_x), test_y, fed.num_classes, runtime,
            k=cfg.knn_k, seed=derive_seed(cfg.seed, "probe"),
        )
        log(INFO, "Pooled probe of %s: kNN %.3f, linear %.3f, MLP %.3f (pooled test accuracy)", name,
            table[name]["knn-pooled-accuracy"], table[name]["linear-pooled-accuracy"], table[name]["mlp-pooled-accuracy"])
        if name == "extractor":
            ceiling = client_ceilings(fed, splits, features, train_h, train_y, runtime)
    rec.stage_details("pooled-probe", {"train-samples": int(train_y.numel()), "test-samples": int(test_y.numel()), **table})
    rec.result("router-ceiling", ceiling, mean_over_clients(ceiling))


def client_ceilings(
    fed: Federation, splits: list[ClientSplits], features: Features, train_h: torch.Tensor, train_y: torch.Tensor,
    runtime: Runtime,
) -> dict[int, dict[str, float]]:
    """The router ceiling on every client's test set(s), with its training class prior
    (one pooled MLP, scored on both test settings)."""
    n = len(splits)
    tests = [s.test for s in splits] + [s.test_iid for s in splits if s.test_iid is not None]
    priors = [torch.bincount(s.train.labels, minlength=fed.num_classes).float() / len(s.train) for s in splits]
    scored = router_ceiling(
        train_h, train_y, [(features(t.images), t.labels.to(runtime.device)) for t in tests], priors + priors,
        fed.num_classes, runtime, seed=derive_seed(fed.cfg.seed, "ceiling"),
    )
    out = {i: dict(scored[i]) for i in range(n)}
    for j, m in enumerate(scored[n:]):  # the IID test setting, where there is one
        out[j] |= {IID_PREFIX + k: v for k, v in m.items()}
    return out


def pooled(splits: list[ClientSplits], part: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All clients' ``train`` or ``test`` images and labels, concatenated."""
    sets = [getattr(s, part) for s in splits]
    return torch.cat([d.images for d in sets]), torch.cat([d.labels for d in sets])
