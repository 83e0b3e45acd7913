"""ClientApp: one handler per message type; each adapts a message to :mod:`nmoe_flwr.algorithms`.

What a client keeps between messages (its environment, its local parameters
in ``context.state``, its files on disk) is :mod:`nmoe_flwr.client_state`.
Handler names come from the message types in :mod:`nmoe_flwr.constants`, so
the server's messages and the client's handlers cannot drift apart.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from torch import nn

from .algorithms import experts, fedce, fedsc, gate, global_moe
from .algorithms.models import ResNet20
from .algorithms.privacy import GaussianMechanism, privatize
from .algorithms.probes import knn_metrics
from .algorithms.routing import class_owners, oracle_predictions, routing_diagnostics
from .algorithms.seeding import derive_seed, generator
from .algorithms.training import DeviceData, FitStats, classification_metrics, evaluate
from .client_state import ClientEnv, load_partial, received_state, split_partial
from .constants import (
    ALPHA,
    ARRAYS,
    ASSIGNED_EXPERTS,
    CLASS_SUPPORT_PREFIX,
    CONFIG,
    CORRELATION,
    CORRELATION_KEY,
    EXPERT_BANK,
    EXPERT_IMPROVEMENT,
    EXPERT_METRIC_PREFIX,
    EXPERT_ROUTED,
    EXTRACTOR_PREFIX,
    HEAD_PREFIX,
    IID_PREFIX,
    IN_CHANNELS,
    METRICS,
    MOE_GATE_PREFIX,
    MSG_CORRELATION,
    MSG_EVAL_CLASSIFIER,
    MSG_EVAL_MOE,
    MSG_EVAL_NMOE,
    MSG_EVAL_PROBE,
    MSG_EXPERT,
    MSG_EXPERT_BANK,
    MSG_FEDCE,
    MSG_FEDSC,
    MSG_GATE,
    MSG_INFO,
    MSG_LATENTS,
    MSG_LOCAL_BASELINE,
    MSG_MOE,
    NOISE_MULTIPLIER,
    NOISE_STD,
    NUM_CLASSES,
    NUM_EXAMPLES,
    NUM_EXPERTS,
    NUM_ROUNDS,
    NUM_TEST,
    NUM_TRAIN,
    ORACLE_PREFIX,
    PARTITION_ID,
    R_EXT_KEY,
    ROUND_OFFSET,
    ROUTING_SHARE,
    SECONDS,
    SERVER_ROUND,
    SHARED_PREFIXES,
    TRAIN_ACC,
    TRAIN_LOSS,
    TRAIN_PREFIX,
    moe_expert_prefix,
)
from .data import ClientSplits, ImageSet
from .faults import inject
from .inference.checkpoint import write_checkpoint
from .inference.evaluation import nmoe_metrics
from .records import (
    bank_from_record,
    from_record,
    is_packed,
    state_subset,
    strip_prefix,
    to_record,
)
from .timeline import timeline_mod

# Every handler's timeline (process start, imports, handler) goes to the client's disk: issue 13's breakdown.
app = ClientApp(mods=[timeline_mod])


def _name(message_type: str) -> str:
    """Handler name of a message type in constants (``"train.fedce"`` -> ``"fedce"``):
    the server's message types and the client's handlers come from one place."""
    return message_type.split(".", 1)[1]


LOCAL_FEDCE = "local-fedce"  # context.state key: FedCE parameters kept local
LOCAL_GATE = "local-gate"  # context.state key: gate parameters kept local


def _reply(msg: Message, metrics: dict[str, float | int], arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({METRICS: MetricRecord(metrics)})
    if arrays is not None:
        content[ARRAYS] = arrays
    return Message(content, reply_to=msg)


def _fit_metrics(stats: FitStats) -> dict[str, float | int]:
    return {NUM_EXAMPLES: stats.num_examples, TRAIN_LOSS: stats.loss, TRAIN_ACC: stats.accuracy, SECONDS: stats.seconds}


def _stage_round(config: ConfigRecord) -> int:
    """The round of the stage: Flower's ``server-round`` plus the rounds done before a resume."""
    return int(config[SERVER_ROUND]) + int(config.get(ROUND_OFFSET, 0))


def _carries_over(env: ClientEnv, stage_round: int | None = None) -> bool:
    """Whether local layers saved by the killed run this one resumes count as
    this run's: on a resume, except in a stage's first round (which starts from
    the initialisation, as in an uninterrupted run). ``None``: not a training round."""
    return env.cfg.resume and (stage_round is None or stage_round > 1)


def _prefixes(msg: Message) -> list[str]:
    return [str(p) for p in msg.content[CONFIG].get(SHARED_PREFIXES, [])]


LATENT_PARTS = {"": "test", IID_PREFIX: "test-iid"}
"""Metric prefix of a test setting -> its part in the client's cached latents."""


def _on_tests(split: ClientSplits, score: Callable[[str, ImageSet], dict[str, float]]) -> dict[str, float]:
    """``score(prefix, test set)`` on the configured test set (no prefix) and,
    under label skew, on the IID one (``iid-`` prefix): the paper's two test
    settings from one run."""
    tests = {"": split.test, IID_PREFIX: split.test_iid}
    return {p + k: v for p, data in tests.items() if data is not None for k, v in score(p, data).items()}


@app.query(_name(MSG_INFO))
def info(msg: Message, context: Context) -> Message:
    """Report the partition id and data sizes (and load/cache the data early,
    so that a missing data set fails before any training)."""
    env = ClientEnv.of(context)
    split = env.splits()
    return _reply(msg, {
        PARTITION_ID: env.partition_id, NUM_TRAIN: len(split.train), NUM_TEST: len(split.test),
        IN_CHANNELS: split.train.images.shape[1], NUM_CLASSES: split.train.num_classes,
    })


def _classifier(env: ClientEnv, split: ClientSplits, seed_purpose: str = "fedce-init", shared_seed: bool = True) -> nn.Module:
    """A fresh classifier; FedCE's starts from the seed every client shares."""
    seed = derive_seed(env.cfg.seed, seed_purpose) if shared_seed else env.seed(seed_purpose)
    return fedce.new_classifier(env.pixel_stats(split), split.train.num_classes, env.cfg.mlp_hidden, seed, env.cfg.extractor_norm)


@app.train(_name(MSG_FEDCE))
def train_fedce(msg: Message, context: Context) -> Message:
    """Stage 1, FedCE: one round of local cross-entropy training of ``H(F(x))``."""
    env = ClientEnv.of(context)
    split = env.splits()
    config = msg.content[CONFIG]
    rnd, num_rounds = _stage_round(config), int(config[NUM_ROUNDS])
    inject(env.cfg, env.partition_id, "fedce", rnd)
    model = _classifier(env, split)
    load_partial(model, msg.content[ARRAYS], context, LOCAL_FEDCE, env.store, _carries_over(env, rnd))
    model = env.runtime.prepare(model)
    stats = fedce.train_classifier(
        model, DeviceData.of(split.train, env.runtime), env.cfg, env.runtime,
        epochs=env.cfg.fedce_local_epochs, lr=fedce.fedce_round_lr(env.cfg.lr, rnd, num_rounds),
        seed=env.seed("fedce", rnd), logit_adjust=env.cfg.fedce_logit_adjust,
        prox_mu=env.cfg.fedce_prox_mu, shared_prefixes=_prefixes(msg),
    )
    shared = split_partial(model, _prefixes(msg), context, LOCAL_FEDCE, env.store, is_packed(msg.content[ARRAYS]))
    return _reply(msg, _fit_metrics(stats), shared)


@app.evaluate(_name(MSG_EVAL_CLASSIFIER))
def evaluate_classifier(msg: Message, context: Context) -> Message:
    """The FedCE end-to-end classifier (global extractor and head, or the
    client's own head if heads were not averaged) on this client's test set."""
    env = ClientEnv.of(context)
    split = env.splits()
    model = _classifier(env, split)
    load_partial(model, msg.content[ARRAYS], context, LOCAL_FEDCE, env.store, _carries_over(env))
    model = env.runtime.prepare(model)
    metrics = _on_tests(split, lambda _, data: _classifier_scores(env, model, data))
    return _reply(msg, {NUM_EXAMPLES: len(split.test), PARTITION_ID: env.partition_id, **metrics})


def _classifier_scores(env: ClientEnv, model: nn.Module, data: ImageSet) -> dict[str, float]:
    return fedce.classifier_metrics(model, DeviceData.of(data, env.runtime), data.num_classes, env.cfg.batch_size * 4, env.runtime)


def _ssl_model(env: ClientEnv, split: ClientSplits, msg: Message) -> fedsc.SSLModel:
    """FedSC's model with the server's weights, on the training device."""
    model = fedsc.new_ssl_model(
        env.pixel_stats(split), env.cfg.fedsc_proj_dim, derive_seed(env.cfg.seed, "fedsc-init"), env.cfg.extractor_norm
    )
    model.load_state_dict(from_record(msg.content[ARRAYS]))
    return env.runtime.prepare(model)


def _ssl_images(split: ClientSplits) -> torch.Tensor:
    """Everything self-supervised training may see: labelled + unlabelled images."""
    if split.unlabeled is None:
        return split.train.images
    return torch.cat([split.train.images, split.unlabeled.images])


@app.query(_name(MSG_CORRELATION))
def fedsc_correlation(msg: Message, context: Context) -> Message:
    """FedSC phase 1: this client's correlation matrix under the global weights,
    with Gaussian noise (``noise-multiplier`` x sensitivity ``sqrt(2) mu / n``)."""
    env = ClientEnv.of(context)
    split = env.splits()
    x = _ssl_images(split)
    config = msg.content[CONFIG]
    rnd = int(config[SERVER_ROUND])
    inject(env.cfg, env.partition_id, "fedsc", rnd)  # failing here leaves the node out of the round's training
    model = _ssl_model(env, split, msg)
    r = fedsc.fedsc_correlation(model, x.to(env.runtime.device), env.cfg, env.runtime, env.seed("corr", rnd))
    mechanism = GaussianMechanism(float(config.get(NOISE_MULTIPLIER, 0.0)), env.cfg.dp_delta)
    std = mechanism.noise_std(env.cfg.fedsc_mu, x.shape[0])
    r = privatize(r, std, generator(env.seed("dp-noise", rnd), env.runtime.device))
    return Message(
        RecordDict({
            CORRELATION: to_record({CORRELATION_KEY: r}),
            METRICS: MetricRecord({NUM_EXAMPLES: x.shape[0], NOISE_STD: std}),
        }),
        reply_to=msg,
    )


@app.train(_name(MSG_FEDSC))
def train_fedsc(msg: Message, context: Context) -> Message:
    """FedSC phase 2: local spectral contrastive training against ``R_ext``."""
    env = ClientEnv.of(context)
    split = env.splits()
    x = _ssl_images(split)
    config = msg.content[CONFIG]
    rnd, num_rounds = int(config[SERVER_ROUND]), int(config[NUM_ROUNDS])
    model = _ssl_model(env, split, msg)
    ext = msg.content[CORRELATION]
    r_ext = from_record(ext)[R_EXT_KEY].to(env.runtime.device) if R_EXT_KEY in ext else None
    stats = fedsc.train_fedsc(
        model, x.to(env.runtime.device), r_ext, float(config[ALPHA]), env.cfg, env.runtime,
        lr=fedsc.fedsc_round_lr(env.cfg.fedsc_lr, rnd, num_rounds), seed=env.seed("fedsc", rnd),
    )
    return _reply(msg, _fit_metrics(stats), to_record(model.state_dict()))


def _latents_of(env: ClientEnv, extractor: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return experts.compute_latents(extractor, images.to(env.runtime.device), env.cfg.batch_size * 4, env.runtime)


@app.evaluate(_name(MSG_EVAL_PROBE))
def evaluate_probe(msg: Message, context: Context) -> Message:
    """Stage-1 extractor quality: kNN on latents (memory: this client's labelled
    training set; queries: its test set)."""
    env = ClientEnv.of(context)
    split = env.splits()
    rt = env.runtime
    model = _classifier(env, split)
    model.load_state_dict({**model.state_dict(), **state_subset(received_state(model, msg.content[ARRAYS]), [EXTRACTOR_PREFIX])})
    model = rt.prepare(model)
    metrics = knn_metrics(
        _latents_of(env, model.extractor, split.train.images), split.train.labels.to(rt.device),
        _latents_of(env, model.extractor, split.test.images), split.test.labels.to(rt.device),
        split.test.num_classes, env.cfg.knn_k,
    )
    return _reply(msg, {NUM_EXAMPLES: len(split.test), PARTITION_ID: env.partition_id, **metrics})


def _freeze_extractor(env: ClientEnv, split: ClientSplits, model: nn.Module) -> dict[str, torch.Tensor]:
    """Latents of the frozen extractor for the train and test sets, computed once
    and kept in the client's store (with the extractor) for the later stages."""
    parts = {"train": split.train, "test": split.test, "test-iid": split.test_iid}
    latents = {name: _latents_of(env, model.extractor, data.images).cpu() for name, data in parts.items() if data is not None}
    env.store.save_latents(latents)
    env.store.save_extractor(model.extractor.state_dict())
    return latents


def _has_trained_head(msg: Message, kept: dict[str, torch.Tensor]) -> bool:
    """Whether stage 1 left this client a classifier head: averaged by the
    server (sent with the extractor) or kept local (``kept``: the local entries
    :func:`load_partial` found in ``context.state`` or, after a node restart, on disk)."""
    return any(k.startswith(HEAD_PREFIX) for k in [*msg.content[ARRAYS], *kept])


@app.train(_name(MSG_EXPERT))
def train_expert(msg: Message, context: Context) -> Message:
    """Stage 2: cache latents of the frozen extractor once, then train this
    client's personalized expert on them (from the FedCE head or scratch)."""
    env = ClientEnv.of(context)
    split = env.splits()
    model = _classifier(env, split)
    kept = load_partial(model, msg.content[ARRAYS], context, LOCAL_FEDCE, env.store, _carries_over(env))
    model = env.runtime.prepare(model)
    rt, cfg = env.runtime, env.cfg
    latents = _freeze_extractor(env, split, model)
    # After the latents are cached: a client whose expert is lost still routes (to the others' experts).
    inject(env.cfg, env.partition_id, "expert", 0)
    head = strip_prefix(model.state_dict(), HEAD_PREFIX)
    has_head = _has_trained_head(msg, kept)
    from_head = cfg.expert_init == "head" or (cfg.expert_init == "auto" and has_head)
    if cfg.expert_init == "head" and not has_head:
        raise ValueError("expert-init = 'head' but stage 1 left this client no head (FedSC, or a saved extractor without head.pt); use 'auto' or 'scratch'")

    def make_expert() -> nn.Module:
        expert = experts.new_expert(split.train.num_classes, cfg.mlp_hidden, env.seed("expert-init"))
        if from_head:
            expert.load_state_dict(head)
        return expert

    expert = rt.prepare(make_expert())
    y_train = split.train.labels.to(rt.device)
    h_train = latents["train"].to(rt.device)
    stats = experts.train_expert(expert, h_train, y_train, cfg, rt, env.seed("expert"))
    if cfg.gate_oof_folds > 1:
        env.store.save_own_oof(experts.out_of_fold_probs(make_expert, h_train, y_train, cfg, rt, env.seed("expert-oof")))
    expert.eval()
    own = _on_tests(split, lambda p, data: evaluate(
        expert, latents[LATENT_PARTS[p]].to(rt.device), data.labels.to(rt.device), data.num_classes, cfg.batch_size * 4, rt
    ))
    metrics = {**_fit_metrics(stats), PARTITION_ID: env.partition_id, **{EXPERT_METRIC_PREFIX + k: v for k, v in own.items()}}
    # What the expert was trained on, per class: the server picks gate candidates by it (algorithms/candidates.py).
    support = torch.bincount(split.train.labels.cpu(), minlength=split.train.num_classes)
    metrics |= {f"{CLASS_SUPPORT_PREFIX}{c}": int(n) for c, n in enumerate(support.tolist())}
    return _reply(msg, metrics, to_record(expert.state_dict()))


@app.query(_name(MSG_LATENTS))
def cache_latents(msg: Message, context: Context) -> Message:
    """Cache latents of the extractor the server sends (alignment pipeline)."""
    env = ClientEnv.of(context)
    split = env.splits()
    model = _classifier(env, split)
    load_partial(model, msg.content[ARRAYS])
    latents = _freeze_extractor(env, split, env.runtime.prepare(model))
    return _reply(msg, {PARTITION_ID: env.partition_id, NUM_TRAIN: latents["train"].shape[0]})


def _global_moe(env: ClientEnv, msg: Message, num_classes: int) -> nn.Module:
    cfg = env.cfg
    model = global_moe.new_global_moe(cfg.mlp_hidden, num_classes, cfg.num_experts, derive_seed(cfg.seed, "moe-init"))
    load_partial(model, msg.content[ARRAYS])
    return env.runtime.prepare(model)


@app.train(_name(MSG_MOE))
def train_moe(msg: Message, context: Context) -> Message:
    """Alignment: train the gate and the assigned experts (routing restricted
    to them) on cached latents; return them with the feedback the server's
    fitness and usage scores need."""
    env = ClientEnv.of(context)
    split = env.splits()
    rt = env.runtime
    config = msg.content[CONFIG]
    inject(env.cfg, env.partition_id, "moe", int(config[SERVER_ROUND]))
    assigned = [int(j) for j in config[ASSIGNED_EXPERTS]]
    model = _global_moe(env, msg, split.train.num_classes)
    out = global_moe.train_moe_round(
        model, assigned, env.store.latents("train").to(rt.device), split.train.labels.to(rt.device), env.cfg, rt,
        env.seed("moe", int(config[SERVER_ROUND])),
    )
    trained = state_subset(model.state_dict(), [MOE_GATE_PREFIX, *(moe_expert_prefix(j) for j in assigned)])
    metrics = {
        **_fit_metrics(out.stats),
        EXPERT_ROUTED: [float(out.routed[j]) for j in assigned],
        EXPERT_IMPROVEMENT: [float(out.improvement[j]) for j in assigned],
        ROUTING_SHARE: [float(v) for v in out.routing_share],
    }
    return _reply(msg, metrics, to_record(trained))


@app.evaluate(_name(MSG_EVAL_MOE))
def evaluate_moe(msg: Message, context: Context) -> Message:
    """Alignment: the global MoE (top-k over all experts) on this client's test set."""
    env = ClientEnv.of(context)
    split = env.splits()
    rt = env.runtime
    model = _global_moe(env, msg, split.test.num_classes)
    metrics = global_moe.moe_metrics(
        model, env.store.latents("test").to(rt.device), split.test.labels.to(rt.device), split.test.num_classes, env.cfg.top_k
    )
    return _reply(msg, {NUM_EXAMPLES: len(split.test), **metrics})


@app.query(_name(MSG_EXPERT_BANK))
def store_expert_bank(msg: Message, context: Context) -> Message:
    """Stage 3 set-up: keep the frozen expert bank on local disk."""
    env = ClientEnv.of(context)
    bank = bank_from_record(msg.content[EXPERT_BANK])
    env.store.save_bank(bank)
    return _reply(msg, {PARTITION_ID: env.partition_id, NUM_EXPERTS: len(bank)})


def _frozen_bank(env: ClientEnv, num_classes: int) -> list[nn.Module | None]:
    """Every client's frozen expert by expert id, on the training device (``None``: lost in stage 2)."""
    return experts.frozen_bank(env.store.bank(), env.cfg.num_clients, env.cfg.mlp_hidden, num_classes, env.runtime)


def _gate(
    env: ClientEnv, msg: Message, context: Context, bank: list[nn.Module | None], stage_round: int | None = None
) -> nn.Module:
    """This client's gate: the server's shared layers over its own local ones
    (``stage_round``: see :func:`_carries_over`); experts missing from ``bank`` are masked."""
    g = gate.new_gate(env.cfg.mlp_hidden, env.cfg.num_clients, derive_seed(env.cfg.seed, "gate-init"))
    load_partial(g, msg.content[ARRAYS], context, LOCAL_GATE, env.store, _carries_over(env, stage_round))
    return env.runtime.prepare(gate.mask_missing(g, gate.available(bank)))


@app.train(_name(MSG_GATE))
def train_gate(msg: Message, context: Context) -> Message:
    """Stage 3: one round of gate training against the frozen expert bank;
    the entries under ``shared-prefixes`` go back to the server."""
    env = ClientEnv.of(context)
    split = env.splits()
    rt = env.runtime
    config = msg.content[CONFIG]
    rnd, num_rounds = _stage_round(config), int(config[NUM_ROUNDS])
    inject(env.cfg, env.partition_id, "gate", rnd)
    latents = env.store.latents("train").to(rt.device)
    bank = _frozen_bank(env, split.train.num_classes)
    probs = gate.bank_probs(bank, latents)
    own = env.partition_id if bank[env.partition_id] is not None else None  # None: its expert was lost in stage 2
    own_oof = env.store.own_oof() if env.cfg.gate_oof_folds > 1 and own is not None else None
    if own_oof is not None:
        probs[:, env.partition_id] = own_oof.to(probs.device)
    g = _gate(env, msg, context, bank, rnd)
    labels = split.train.labels.to(rt.device)
    stats = gate.train_gate(
        g, latents, labels, probs, env.cfg, rt, server_round=rnd, num_rounds=num_rounds, seed=env.seed("gate", rnd),
        present=gate.available(bank), own=own,
    )
    metrics = _fit_metrics(stats)
    owners = _owners(env, split.train.num_classes)
    if owners is not None:  # where the trained gate sends its own training samples
        g.eval()
        with torch.no_grad():
            top1 = g(latents).argmax(1)
        diag = routing_diagnostics(top1, labels, env.partition_id, owners, split.train.num_classes)
        metrics |= {TRAIN_PREFIX + k: v for k, v in diag.items()}
    return _reply(msg, metrics, split_partial(g, _prefixes(msg), context, LOCAL_GATE, env.store, is_packed(msg.content[ARRAYS])))


def _owners(env: ClientEnv, num_classes: int) -> dict[int, list[int]] | None:
    """Class owners under label skew; ``None`` for an IID partition (no owners)."""
    return class_owners(env.cfg.num_clients, num_classes) if env.cfg.partition == "dominant" else None


@app.evaluate(_name(MSG_EVAL_NMOE))
def evaluate_nmoe(msg: Message, context: Context) -> Message:
    """NMoE prediction on this client's test set: its gate picks the top-k of
    all clients' experts; reports accuracy, macro-F1, share routed away and,
    under label skew, the routing diagnostics and the two oracle routings.
    Also writes this client's inference checkpoint."""
    env = ClientEnv.of(context)
    split = env.splits()
    num_classes = split.test.num_classes
    bank = _frozen_bank(env, num_classes)
    g = _gate(env, msg, context, bank)
    owners = _owners(env, num_classes)

    def score(prefix: str, data: ImageSet) -> dict[str, float]:
        latents, labels = env.store.latents(LATENT_PARTS[prefix]).to(env.runtime.device), data.labels.to(env.runtime.device)
        metrics = nmoe_metrics(g, bank, latents, labels, env.partition_id, num_classes, env.cfg.top_k, owners)
        if owners is not None:  # ideal routings over the same bank (they look at the label)
            probs = gate.bank_probs(bank, latents)
            for name, pred in oracle_predictions(probs, labels, env.partition_id, owners).items():
                metrics |= {f"{ORACLE_PREFIX}{name}-{k}": v for k, v in classification_metrics(pred, labels, num_classes).items()}
        return metrics

    metrics = _on_tests(split, score)
    if bank[env.partition_id] is not None:  # a device whose expert was lost serves none
        _write_checkpoint(env, g, bank[env.partition_id], split)
    return _reply(msg, {NUM_EXAMPLES: len(split.test), PARTITION_ID: env.partition_id, **metrics})


def _write_checkpoint(env: ClientEnv, g: nn.Module, expert: nn.Module, split: ClientSplits) -> None:
    """What this device needs for serverless inference (nmoe serve-expert / nmoe infer)."""
    stats = env.pixel_stats(split)
    write_checkpoint(
        env.store.checkpoint_dir,
        {"extractor": env.store.extractor(), "gate": g.state_dict(), "expert": expert.state_dict()},
        {
            "partition-id": env.partition_id, "num-experts": env.cfg.num_clients,
            "in-channels": stats.channels, "num-classes": split.test.num_classes,
            "pixel-mean": list(stats.mean), "pixel-std": list(stats.std),
            "latent-dim": ResNet20.out_dim, "mlp-hidden": env.cfg.mlp_hidden, "top-k": env.cfg.top_k,
            "dataset": env.cfg.dataset, "run": env.store.folder.parents[1].name,
        },
    )


@app.train(_name(MSG_LOCAL_BASELINE))
def train_local_classifier(msg: Message, context: Context) -> Message:
    """Baseline: a classifier trained on this client's data alone, scored on its test set."""
    env = ClientEnv.of(context)
    split = env.splits()
    t0 = time.perf_counter()
    model = env.runtime.prepare(_classifier(env, split, "local-init", shared_seed=False))
    fedce.train_classifier(
        model, DeviceData.of(split.train, env.runtime), env.cfg, env.runtime,
        epochs=env.cfg.local_epochs, lr=env.cfg.lr, seed=env.seed("local"), lr_schedule=True,
    )
    metrics = _on_tests(split, lambda _, data: _classifier_scores(env, model, data))
    return _reply(msg, {NUM_EXAMPLES: len(split.test), PARTITION_ID: env.partition_id, SECONDS: time.perf_counter() - t0, **metrics})
