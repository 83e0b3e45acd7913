"""Stage 1 on the server: a registry of the methods that train the shared extractor.

Every method takes the :class:`~.messaging.Federation` and the run's
:class:`~.results.RunRecorder` and returns one ArrayRecord holding the
extractor (``extractor.*``) and, for methods that train one, a classifier
head (``head.*``) that stage 2 may start the experts from. Adding a method:

1. its client computation in ``algorithms/<method>.py``;
2. its message types in ``constants.py`` and handlers in ``client_app.py``;
3. a function here, registered in :data:`EXTRACTOR_METHODS`;
4. its name in ``config.FE_METHODS`` and its keys in ``config.py`` and
   ``pyproject.toml``.
"""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.supercore import log

from ..algorithms.fedce import new_classifier
from ..algorithms.fedsc import alpha_at, new_ssl_model
from ..algorithms.models import ResNet20
from ..algorithms.privacy import GaussianMechanism
from ..algorithms.seeding import derive_seed
from ..algorithms.training import mean_over_clients
from ..config import FE_METHODS, ConfigError
from ..constants import (
    EXTRACTOR_PREFIX,
    HEAD_PREFIX,
    MSG_CORRELATION,
    MSG_EVAL_CLASSIFIER,
    MSG_FEDCE,
    MSG_FEDSC,
    NOISE_MULTIPLIER,
    NUM_ROUNDS,
)
from ..data import pixel_stats_for
from ..records import add_prefix, from_record, strip_prefix, to_record
from ..strategies import FedSC, split_shared
from .messaging import Federation, rounds_of, weights_message
from .results import RunRecorder
from .resume import StageCheckpoint

EXTRACTOR_FILE = "extractor.pt"  # <run>/extractor.pt: a bare ResNet20 state dict
HEAD_FILE = "head.pt"  # <run>/head.pt: the averaged FedCE head (bare MLP state dict), when there is one

ExtractorMethod = Callable[[Federation, RunRecorder], ArrayRecord]
"""``method(federation, recorder) -> ArrayRecord`` of ``extractor.*`` (and ``head.*``)."""


def _pixel_stats(fed: Federation):
    return pixel_stats_for(fed.cfg.dataset, fed.cfg.hf_dataset, fed.in_channels)


def train_fedce(fed: Federation, rec: RunRecorder) -> ArrayRecord:
    """FedCE (NMoE paper, Eq. 1): :class:`PartialFedAvg` over the end-to-end
    classifier (``extractor.``, and ``head.`` if ``fedce-average-head``), then
    the FedCE classifier on every client's test set (a baseline)."""
    cfg = fed.cfg
    prefixes = (EXTRACTOR_PREFIX, HEAD_PREFIX) if cfg.fedce_average_head else (EXTRACTOR_PREFIX,)
    init = new_classifier(_pixel_stats(fed), fed.num_classes, cfg.mlp_hidden, derive_seed(cfg.seed, "fedce-init"), cfg.extractor_norm)
    checkpoint = StageCheckpoint(rec.folder, "fedce")
    arrays, rounds, missing = rec.timed(
        "stage1-fedce", lambda: fed.partial_fedavg(
            init.state_dict(), prefixes, MSG_FEDCE, cfg.fedce_rounds, checkpoint, cfg.fedce_server_momentum
        )
    )
    rec.add_rounds("fedce", rounds)
    rec.stage_details("fedce", {"shared-prefixes": list(prefixes), "rounds": rounds, "missing-replies": missing})
    missing: dict[int, str] = {}
    per_client = rec.timed(
        "eval-fedce-classifier", lambda: fed.broadcast_metrics(weights_message(arrays), MSG_EVAL_CLASSIFIER, missing)
    )
    rec.result("fedce-classifier", per_client, mean_over_clients(per_client), missing)
    rec.save()
    return arrays


def train_fedsc(fed: Federation, rec: RunRecorder) -> ArrayRecord:
    """FedSC: :class:`~nmoe_flwr.strategies.FedSC` with differentially private
    correlation matrices; the privacy budget actually spent is recorded."""
    cfg = fed.cfg
    num_rounds = cfg.fedsc_rounds
    mechanism = GaussianMechanism.for_budget(cfg.dp_epsilon, cfg.dp_delta, num_rounds)
    log(INFO, "FedSC: noise multiplier %.3f for (epsilon %s, delta %g) over %d rounds",
        mechanism.noise_multiplier, cfg.dp_epsilon, cfg.dp_delta, num_rounds)
    strategy = FedSC(
        alpha=lambda r: alpha_at(r, num_rounds, cfg.fedsc_alpha_start, cfg.fedsc_alpha_end),
        correlation_message_type=MSG_CORRELATION,
        train_message_type=MSG_FEDSC,
        stale_matrices=cfg.fedsc_stale_matrices,
        timeout=cfg.round_timeout,
        correlation_dim=cfg.fedsc_proj_dim,
        node_wait=cfg.rejoin_timeout, sample_seed=cfg.seed, node_order=fed.pids,
        fraction_train=cfg.fraction_train,
        fraction_evaluate=0.0,
        min_available_nodes=cfg.num_clients,
    )
    init = new_ssl_model(_pixel_stats(fed), cfg.fedsc_proj_dim, derive_seed(cfg.seed, "fedsc-init"), cfg.extractor_norm)
    result = rec.timed("stage1-fedsc", lambda: strategy.start(
        grid=fed.grid, initial_arrays=to_record(init.state_dict()), num_rounds=num_rounds, timeout=cfg.round_timeout,
        train_config=ConfigRecord({NUM_ROUNDS: num_rounds, NOISE_MULTIPLIER: mechanism.noise_multiplier}),
    ))
    rounds = rounds_of(result, num_rounds, MSG_FEDSC)
    missing = {r: {fed.pids.get(n, n): why for n, why in lost.items()} | fed.absent(strategy.connected.get(r))
               for r, lost in strategy.missing.items()}
    missing = {r: lost for r, lost in missing.items() if lost}
    for r, metrics in rounds.items():
        metrics["replies"] = len(strategy.sampled.get(r, ())) - len(strategy.missing.get(r, {}))
    releases = max(strategy.releases.values(), default=0)
    spent = mechanism.epsilon(releases)
    log(INFO, "FedSC: epsilon spent %.3f (delta %g) after %d releases per client", spent, cfg.dp_delta, releases)
    rec.add_rounds("fedsc", rounds)
    rec.stage_details("fedsc", {
        "rounds": rounds,
        "noise-multiplier": mechanism.noise_multiplier,
        "dp-epsilon-target": cfg.dp_epsilon,
        "dp-delta": cfg.dp_delta,
        "dp-epsilon-spent": spent,
        "matrix-releases-per-client-max": releases,
        "stale-matrices": cfg.fedsc_stale_matrices,
        "missing-replies": missing,
    })
    rec.save()
    return result.arrays


EXTRACTOR_METHODS: dict[str, ExtractorMethod] = {"fedce": train_fedce, "fedsc": train_fedsc}
assert tuple(EXTRACTOR_METHODS) == FE_METHODS, "config.FE_METHODS and EXTRACTOR_METHODS must list the same methods"


def train_extractor(fed: Federation, rec: RunRecorder) -> ArrayRecord:
    """Stage 1 by ``fe-method``, or the saved extractor of ``extractor-checkpoint``.

    Returns the extractor (and head, where the method trains one) and saves
    them as ``<run>/extractor.pt`` (a bare ResNet20 state dict, the format
    ``extractor-checkpoint`` reads) and ``<run>/head.pt``, so later runs can
    reuse them: stages 2-3 iterate in a minute on a saved stage 1.
    """
    cfg = fed.cfg
    saved = cfg.extractor_checkpoint
    if cfg.resume and rec.has("stages", cfg.fe_method) and (rec.folder / EXTRACTOR_FILE).exists():
        saved = str(rec.folder / EXTRACTOR_FILE)  # stage 1 had finished before the crash
    if saved:
        log(INFO, "Using the extractor in %s (stage 1 skipped)", saved)
        rec.note("extractor-checkpoint" if cfg.extractor_checkpoint else "extractor-resumed", saved)
        state = add_prefix(load_extractor(saved, cfg.extractor_norm), EXTRACTOR_PREFIX)
        head = Path(saved).with_name(HEAD_FILE)
        if head.exists():  # the averaged FedCE head of the same run: experts can start from it
            state |= add_prefix(torch.load(head, weights_only=True), HEAD_PREFIX)
            rec.note("head-checkpoint", str(head))
        arrays = to_record(state)
    else:
        arrays, _ = split_shared(EXTRACTOR_METHODS[cfg.fe_method](fed, rec), (EXTRACTOR_PREFIX, HEAD_PREFIX))
    state = from_record(arrays)
    torch.save(strip_prefix(state, EXTRACTOR_PREFIX), rec.folder / EXTRACTOR_FILE)
    if any(k.startswith(HEAD_PREFIX) for k in state):
        torch.save(strip_prefix(state, HEAD_PREFIX), rec.folder / HEAD_FILE)
    rec.note("extractor-saved", str(rec.folder / EXTRACTOR_FILE))
    return arrays


def load_extractor(path: str, norm: str | None = None) -> dict[str, torch.Tensor]:
    """A saved extractor as a bare ResNet20 state dict.

    Accepts the bare format every ``extractor.pt`` of this version has and
    the ``extractor.``-prefixed one that earlier versions wrote. With
    ``norm``, the extractor must have that ``extractor-norm``
    (:class:`ConfigError` naming the key otherwise, not a state-dict error
    deep in a client).
    """
    state = torch.load(path, weights_only=True)
    if any(k.startswith(EXTRACTOR_PREFIX) for k in state):
        state = strip_prefix(state, EXTRACTOR_PREFIX)
    if norm is not None and (found := ResNet20.norm_of(state)) != norm:
        raise ConfigError(f"{path} holds a ResNet20 with extractor-norm = {found!r}, this run has {norm!r}: "
                          f"set extractor-norm = {found!r} to use it")
    return state
