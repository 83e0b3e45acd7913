"""ClientApp: one handler per stage; each adapts messages to :mod:`nmoe_flwr.stages`.

Per-client state that must survive rounds and stages:

- ``context.state`` (serialised with every message, so kept small): the
  *local* parameters of partially averaged models -- the FedCE head when it
  is not averaged, the gate's decision layer (or the whole gate for
  ``gate-method = "local"``).
- the client's folder on local disk (``<output-dir>/<run-name>/clients/<id>``):
  its data split, the latents cached after stage 1 and the frozen expert bank.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from . import stages
from .config import RunConfig, parse_run_config
from .constants import (
    ALPHA,
    ARRAYS,
    ASSIGNED_EXPERTS,
    CONFIG,
    CORRELATION,
    CORRELATION_KEY,
    EXPERT_BANK,
    EXPERT_IMPROVEMENT,
    EXPERT_ROUTED,
    EXTRACTOR_PREFIX,
    HEAD_PREFIX,
    IN_CHANNELS,
    METRICS,
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
    NODE_DATA_DIR,
    NODE_NUM_PARTITIONS,
    NODE_OUTPUT_DIR,
    NODE_PARTITION_ID,
    NOISE_MULTIPLIER,
    NOISE_STD,
    NUM_CLASSES,
    NUM_EXAMPLES,
    NUM_EXPERTS,
    NUM_ROUNDS,
    NUM_TEST,
    NUM_TRAIN,
    PARTITION_ID,
    R_EXT_KEY,
    ROUTING_SHARE,
    SECONDS,
    SERVER_ROUND,
    SHARED_PREFIXES,
    TRAIN_ACC,
    TRAIN_LOSS,
)
from .data import ClientSplits
from .data.federated import client_splits
from .inference.checkpoint import client_checkpoint_dir, write_checkpoint
from .models import MLP, ResNet20, state_subset
from .privacy import GaussianMechanism, privatize
from .records import bank_from_record, from_record, to_record
from .seeding import derive_seed, generator
from .training import FitStats, Runtime, evaluate, resolve_runtime, set_torch_threads
from .workspace import cache_dir, client_dir, run_dir

app = ClientApp()


def _name(message_type: str) -> str:
    """Handler name of a message type in constants (``"train.fedce"`` -> ``"fedce"``):
    the server's message types and the client's handlers come from one place."""
    return message_type.split(".", 1)[1]


LOCAL_FEDCE = "local-fedce"  # context.state key: FedCE parameters kept local
LOCAL_GATE = "local-gate"  # context.state key: gate parameters kept local


@dataclass(frozen=True)
class ClientEnv:
    """Everything a handler needs, derived from the Context once per message."""

    cfg: RunConfig
    partition_id: int
    workdir: Path
    runtime: Runtime

    @classmethod
    def of(cls, context: Context) -> ClientEnv:
        """Parse the run config and the node config; fail with the missing key named.

        One code path for simulation and deployment: Flower's simulation sets
        ``partition-id`` and ``num-partitions`` itself; a SuperNode gets them
        (and optionally ``data-dir``, ``output-dir`` for its own disk) from
        ``--node-config``.
        """
        cfg = parse_run_config(context.run_config)
        node = context.node_config
        missing = [k for k in (NODE_PARTITION_ID, NODE_NUM_PARTITIONS) if k not in node]
        if missing:
            raise ValueError(
                f"node_config lacks {', '.join(missing)}; start the SuperNode with "
                f'--node-config "partition-id=<i> num-partitions={cfg.num_clients}" '
                f"(optional keys: {NODE_DATA_DIR}, {NODE_OUTPUT_DIR})"
            )
        local = {
            field: str(node[key])
            for key, field in ((NODE_DATA_DIR, "data_dir"), (NODE_OUTPUT_DIR, "output_dir"))
            if key in node
        }
        if local:
            cfg = cfg.model_copy(update=local)
        pid, n = int(node[NODE_PARTITION_ID]), int(node[NODE_NUM_PARTITIONS])
        if n != cfg.num_clients or not 0 <= pid < n:
            raise ValueError(
                f"node has partition-id={pid}, num-partitions={n} but the run config says "
                f"num-clients={cfg.num_clients}; simulate with --federation-config "
                f'"num-supernodes={cfg.num_clients}"'
            )
        set_torch_threads(cfg.torch_threads)
        run = run_dir(cfg.output_dir, cfg.run_name, context.run_id)
        return cls(cfg, pid, client_dir(run, pid), resolve_runtime(cfg.device, cfg.amp, cfg.channels_last))

    def splits(self) -> ClientSplits:
        """This client's train/test data (cached on its disk)."""
        return client_splits(self.cfg, self.partition_id, self.workdir, cache_dir(self.cfg.output_dir))

    def seed(self, *parts: object) -> int:
        """A seed private to this client and purpose."""
        return derive_seed(self.cfg.seed, self.partition_id, *parts)


def _reply(msg: Message, metrics: dict[str, float | int], arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({METRICS: MetricRecord(metrics)})
    if arrays is not None:
        content[ARRAYS] = arrays
    return Message(content, reply_to=msg)


def _fit_metrics(stats: FitStats) -> dict[str, float | int]:
    return {NUM_EXAMPLES: stats.num_examples, TRAIN_LOSS: stats.loss, TRAIN_ACC: stats.accuracy, SECONDS: stats.seconds}


def _load_partial(model: nn.Module, msg: Message, context: Context, state_key: str) -> None:
    """Load the server's shared entries, then this client's local ones (if any yet)."""
    shared = from_record(msg.content[ARRAYS])
    local = from_record(context.state[state_key]) if state_key in context.state else {}
    unknown = set(shared) - set(model.state_dict())
    if unknown:
        raise ValueError(f"server sent unknown parameters {sorted(unknown)[:5]}")
    model.load_state_dict({**model.state_dict(), **shared, **local})


def _split_partial(model: nn.Module, prefixes: list[str], context: Context, state_key: str) -> ArrayRecord:
    """Keep the local entries in ``context.state``; return the shared ones for the server."""
    state = model.state_dict()
    shared = state_subset(state, prefixes)
    context.state[state_key] = to_record({k: v for k, v in state.items() if k not in shared})
    return to_record(shared)


def _prefixes(msg: Message) -> list[str]:
    return [str(p) for p in msg.content[CONFIG].get(SHARED_PREFIXES, [])]


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


def _classifier(env: ClientEnv, split: ClientSplits) -> nn.Module:
    return stages.new_classifier(
        env.cfg, split.train.images.shape[1], split.train.num_classes, derive_seed(env.cfg.seed, "fedce-init")
    )


@app.train(_name(MSG_FEDCE))
def train_fedce(msg: Message, context: Context) -> Message:
    """Stage 1, FedCE: one round of local cross-entropy training of ``H(F(x))``."""
    env = ClientEnv.of(context)
    split = env.splits()
    config = msg.content[CONFIG]
    rnd, num_rounds = int(config[SERVER_ROUND]), int(config[NUM_ROUNDS])
    model = _classifier(env, split)
    _load_partial(model, msg, context, LOCAL_FEDCE)
    model = env.runtime.prepare(model)
    stats = stages.train_classifier(
        model, stages.DeviceData.of(split.train, env.runtime), env.cfg, env.runtime,
        epochs=env.cfg.fedce_local_epochs, lr=stages.fedce_round_lr(env.cfg, rnd, num_rounds),
        seed=env.seed("fedce", rnd),
    )
    return _reply(msg, _fit_metrics(stats), _split_partial(model, _prefixes(msg), context, LOCAL_FEDCE))


@app.evaluate(_name(MSG_EVAL_CLASSIFIER))
def evaluate_classifier(msg: Message, context: Context) -> Message:
    """The FedCE end-to-end classifier (global extractor and head, or the
    client's own head if heads were not averaged) on this client's test set."""
    env = ClientEnv.of(context)
    split = env.splits()
    model = _classifier(env, split)
    _load_partial(model, msg, context, LOCAL_FEDCE)
    model = env.runtime.prepare(model)
    test = stages.DeviceData.of(split.test, env.runtime)
    metrics = stages.classifier_metrics(model, test, split.test.num_classes, env.cfg, env.runtime)
    return _reply(msg, {NUM_EXAMPLES: len(split.test), PARTITION_ID: env.partition_id, **metrics})


@app.query(_name(MSG_CORRELATION))
def fedsc_correlation(msg: Message, context: Context) -> Message:
    """FedSC phase 1: this client's correlation matrix under the global weights,
    with Gaussian noise (``noise-multiplier`` x sensitivity ``2 mu / n``)."""
    env = ClientEnv.of(context)
    x = _ssl_images(env)
    config = msg.content[CONFIG]
    rnd = int(config[SERVER_ROUND])
    model = stages.new_ssl_model(env.cfg, x.shape[1], derive_seed(env.cfg.seed, "fedsc-init"))
    model.load_state_dict(from_record(msg.content[ARRAYS]))
    model = env.runtime.prepare(model)
    r = stages.fedsc_correlation(model, x.to(env.runtime.device), env.cfg, env.runtime, env.seed("corr", rnd))
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


def _ssl_images(env: ClientEnv) -> torch.Tensor:
    """Everything self-supervised training may see: labelled + unlabelled images."""
    split = env.splits()
    if split.unlabeled is None:
        return split.train.images
    return torch.cat([split.train.images, split.unlabeled.images])


@app.train(_name(MSG_FEDSC))
def train_fedsc(msg: Message, context: Context) -> Message:
    """FedSC phase 2: local spectral contrastive training against ``R_ext``."""
    env = ClientEnv.of(context)
    x = _ssl_images(env)
    config = msg.content[CONFIG]
    rnd, num_rounds = int(config[SERVER_ROUND]), int(config[NUM_ROUNDS])
    model = stages.new_ssl_model(env.cfg, x.shape[1], derive_seed(env.cfg.seed, "fedsc-init"))
    model.load_state_dict(from_record(msg.content[ARRAYS]))
    model = env.runtime.prepare(model)
    ext = msg.content[CORRELATION]
    r_ext = from_record(ext)[R_EXT_KEY].to(env.runtime.device) if R_EXT_KEY in ext else None
    stats = stages.train_fedsc(
        model, x.to(env.runtime.device), r_ext, float(config[ALPHA]), env.cfg, env.runtime,
        lr=stages.fedsc_round_lr(env.cfg, rnd, num_rounds), seed=env.seed("fedsc", rnd),
    )
    return _reply(msg, _fit_metrics(stats), to_record(model.state_dict()))


@app.evaluate(_name(MSG_EVAL_PROBE))
def evaluate_probe(msg: Message, context: Context) -> Message:
    """Stage-1 extractor quality: kNN on latents (memory: this client's labelled
    training set; queries: its test set)."""
    env = ClientEnv.of(context)
    split = env.splits()
    rt = env.runtime
    model = _classifier(env, split)
    model.load_state_dict({**model.state_dict(), **state_subset(from_record(msg.content[ARRAYS]), [EXTRACTOR_PREFIX])})
    model = rt.prepare(model)
    train_h = stages.compute_latents(model.extractor, split.train.images.to(rt.device), env.cfg, rt)
    test_h = stages.compute_latents(model.extractor, split.test.images.to(rt.device), env.cfg, rt)
    metrics = stages.knn_metrics(
        train_h, split.train.labels.to(rt.device), test_h, split.test.labels.to(rt.device),
        split.test.num_classes, env.cfg.knn_k,
    )
    return _reply(msg, {NUM_EXAMPLES: len(split.test), PARTITION_ID: env.partition_id, **metrics})


def _cache_latents(env: ClientEnv, split: ClientSplits, model: nn.Module) -> dict[str, torch.Tensor]:
    """Latents of the frozen extractor for the train and test sets, computed once
    and kept on the client's disk for the later stages."""
    rt, cfg = env.runtime, env.cfg
    latents = {
        name: stages.compute_latents(model.extractor, data.images.to(rt.device), cfg, rt).cpu()
        for name, data in (("train", split.train), ("test", split.test))
    }
    torch.save(latents, env.workdir / "latents.pt")
    torch.save(state_subset(model.state_dict(), [EXTRACTOR_PREFIX]), env.workdir / "extractor.pt")
    return latents


@app.train(_name(MSG_EXPERT))
def train_expert(msg: Message, context: Context) -> Message:
    """Stage 2: cache latents of the frozen extractor once, then train this
    client's personalized expert on them (from the FedCE head or scratch)."""
    env = ClientEnv.of(context)
    split = env.splits()
    model = _classifier(env, split)
    _load_partial(model, msg, context, LOCAL_FEDCE)
    model = env.runtime.prepare(model)
    rt, cfg = env.runtime, env.cfg
    latents = _cache_latents(env, split, model)
    head = {k.removeprefix(HEAD_PREFIX): v for k, v in model.state_dict().items() if k.startswith(HEAD_PREFIX)}

    def make_expert() -> nn.Module:
        expert = stages.new_expert(cfg, split.train.num_classes, env.seed("expert-init"))
        if cfg.expert_from_head:
            expert.load_state_dict(head)
        return expert

    expert = rt.prepare(make_expert())
    y_train, y_test = split.train.labels.to(rt.device), split.test.labels.to(rt.device)
    h_train = latents["train"].to(rt.device)
    stats = stages.train_expert(expert, h_train, y_train, cfg, rt, env.seed("expert"))
    if cfg.gate_oof_folds > 1:
        oof = stages.out_of_fold_probs(make_expert, h_train, y_train, cfg, rt, env.seed("expert-oof"))
        torch.save({"probs": oof.cpu()}, env.workdir / "own-oof.pt")
    expert.eval()
    own = evaluate(expert, latents["test"].to(rt.device), y_test, split.test.num_classes, cfg.batch_size * 4, rt)
    metrics = {**_fit_metrics(stats), PARTITION_ID: env.partition_id, **{f"expert-{k}": v for k, v in own.items()}}
    return _reply(msg, metrics, to_record(expert.state_dict()))


@app.query(_name(MSG_LATENTS))
def cache_latents(msg: Message, context: Context) -> Message:
    """Cache latents of the extractor the server sends (alignment pipeline)."""
    env = ClientEnv.of(context)
    split = env.splits()
    model = _classifier(env, split)
    model.load_state_dict({**model.state_dict(), **from_record(msg.content[ARRAYS])})
    latents = _cache_latents(env, split, env.runtime.prepare(model))
    return _reply(msg, {PARTITION_ID: env.partition_id, NUM_TRAIN: latents["train"].shape[0]})


def _global_moe(env: ClientEnv, msg: Message, num_classes: int) -> nn.Module:
    model = stages.new_global_moe(env.cfg, num_classes, derive_seed(env.cfg.seed, "moe-init"))
    received = from_record(msg.content[ARRAYS])
    unknown = set(received) - set(model.state_dict())
    if unknown:
        raise ValueError(f"server sent unknown parameters {sorted(unknown)[:5]}")
    model.load_state_dict({**model.state_dict(), **received})
    return env.runtime.prepare(model)


@app.train(_name(MSG_MOE))
def train_moe(msg: Message, context: Context) -> Message:
    """Alignment: train the gate and the assigned experts (routing restricted
    to them) on cached latents; return them with the feedback the server's
    fitness and usage scores need."""
    env = ClientEnv.of(context)
    split = env.splits()
    rt = env.runtime
    latents = torch.load(env.workdir / "latents.pt", weights_only=True)["train"].to(rt.device)
    config = msg.content[CONFIG]
    assigned = [int(j) for j in config[ASSIGNED_EXPERTS]]
    model = _global_moe(env, msg, split.train.num_classes)
    out = stages.train_moe_round(
        model, assigned, latents, split.train.labels.to(rt.device), env.cfg, rt, env.seed("moe", int(config[SERVER_ROUND]))
    )
    state = model.state_dict()
    keep = ("gate.", *(f"experts.{j}." for j in assigned))
    metrics = {
        **_fit_metrics(out["stats"]),
        EXPERT_ROUTED: [float(out["routed"][j]) for j in assigned],
        EXPERT_IMPROVEMENT: [float(out["improvement"][j]) for j in assigned],
        ROUTING_SHARE: [float(v) for v in out["routing-share"]],
    }
    return _reply(msg, metrics, to_record({k: v for k, v in state.items() if k.startswith(keep)}))


@app.evaluate(_name(MSG_EVAL_MOE))
def evaluate_moe(msg: Message, context: Context) -> Message:
    """Alignment: the global MoE (top-k over all experts) on this client's test set."""
    env = ClientEnv.of(context)
    split = env.splits()
    rt = env.runtime
    latents = torch.load(env.workdir / "latents.pt", weights_only=True)["test"].to(rt.device)
    model = _global_moe(env, msg, split.test.num_classes)
    metrics = stages.moe_metrics(model, latents, split.test.labels.to(rt.device), split.test.num_classes, env.cfg.top_k)
    return _reply(msg, {NUM_EXAMPLES: len(split.test), **metrics})


@app.query(_name(MSG_EXPERT_BANK))
def store_expert_bank(msg: Message, context: Context) -> Message:
    """Stage 3 set-up: keep the frozen expert bank on local disk."""
    env = ClientEnv.of(context)
    bank = bank_from_record(msg.content[EXPERT_BANK])
    torch.save(bank, env.workdir / "bank.pt")
    return _reply(msg, {PARTITION_ID: env.partition_id, NUM_EXPERTS: len(bank)})


def _gate_inputs(env: ClientEnv, split_name: str) -> tuple[torch.Tensor, list[nn.Module], int]:
    """Cached latents of one split, the frozen experts, and the class count."""
    rt = env.runtime
    latents = torch.load(env.workdir / "latents.pt", weights_only=True)[split_name].to(rt.device)
    bank = torch.load(env.workdir / "bank.pt", weights_only=True)
    num_classes = next(iter(bank.values()))["net.6.weight"].shape[0]
    experts = []
    for state in bank.values():
        expert = MLP(latents.shape[1], env.cfg.mlp_hidden, num_classes)
        expert.load_state_dict(state)
        experts.append(rt.prepare(expert).eval().requires_grad_(False))
    return latents, experts, num_classes


@app.train(_name(MSG_GATE))
def train_gate(msg: Message, context: Context) -> Message:
    """Stage 3: one round of gate training against the frozen expert bank;
    the entries under ``shared-prefixes`` go back to the server."""
    env = ClientEnv.of(context)
    split = env.splits()
    config = msg.content[CONFIG]
    rnd, num_rounds = int(config[SERVER_ROUND]), int(config[NUM_ROUNDS])
    latents, experts, _ = _gate_inputs(env, "train")
    gate = stages.new_gate(env.cfg, derive_seed(env.cfg.seed, "gate-init"))
    _load_partial(gate, msg, context, LOCAL_GATE)
    gate = env.runtime.prepare(gate)
    labels = split.train.labels.to(env.runtime.device)
    probs = stages.bank_probs(experts, latents)
    oof_path = env.workdir / "own-oof.pt"
    if env.cfg.gate_oof_folds > 1 and oof_path.exists():
        probs[:, env.partition_id] = torch.load(oof_path, weights_only=True)["probs"].to(probs.device)
    stats = stages.train_gate(
        gate, latents, labels, probs, env.cfg, env.runtime,
        server_round=rnd, num_rounds=num_rounds, seed=env.seed("gate", rnd),
    )
    return _reply(msg, _fit_metrics(stats), _split_partial(gate, _prefixes(msg), context, LOCAL_GATE))


@app.evaluate(_name(MSG_EVAL_NMOE))
def evaluate_nmoe(msg: Message, context: Context) -> Message:
    """NMoE prediction on this client's test set: its gate picks the top-k of
    all clients' experts; reports accuracy, macro-F1, share routed away."""
    env = ClientEnv.of(context)
    split = env.splits()
    latents, experts, num_classes = _gate_inputs(env, "test")
    gate = stages.new_gate(env.cfg, derive_seed(env.cfg.seed, "gate-init"))
    _load_partial(gate, msg, context, LOCAL_GATE)
    gate = env.runtime.prepare(gate)
    metrics = stages.nmoe_metrics(
        gate, experts, latents, split.test.labels.to(env.runtime.device), env.partition_id, num_classes, env.cfg.top_k
    )
    _write_checkpoint(env, gate, experts[env.partition_id], split, num_classes)
    return _reply(msg, {NUM_EXAMPLES: len(split.test), PARTITION_ID: env.partition_id, **metrics})


def _write_checkpoint(env: ClientEnv, gate: nn.Module, expert: nn.Module, split: ClientSplits, num_classes: int) -> None:
    """What this device needs for serverless inference (nmoe serve-expert / nmoe infer)."""
    extractor = torch.load(env.workdir / "extractor.pt", weights_only=True)
    folder = client_checkpoint_dir(env.workdir.parents[1], env.partition_id)
    write_checkpoint(
        folder,
        {
            "extractor": {k.removeprefix(EXTRACTOR_PREFIX): v for k, v in extractor.items()},
            "gate": gate.state_dict(),
            "expert": expert.state_dict(),
        },
        {
            "partition-id": env.partition_id, "num-experts": env.cfg.num_clients,
            "in-channels": int(split.train.images.shape[1]), "num-classes": num_classes,
            "latent-dim": ResNet20.out_dim, "mlp-hidden": env.cfg.mlp_hidden, "top-k": env.cfg.top_k,
            "dataset": env.cfg.dataset, "run": env.workdir.parents[1].name,
        },
    )


@app.train(_name(MSG_LOCAL_BASELINE))
def train_local_classifier(msg: Message, context: Context) -> Message:
    """Baseline: a classifier trained on this client's data alone, scored on its test set."""
    env = ClientEnv.of(context)
    split = env.splits()
    t0 = time.perf_counter()
    model = stages.new_classifier(env.cfg, split.train.images.shape[1], split.train.num_classes, env.seed("local-init"))
    model = env.runtime.prepare(model)
    stages.train_classifier(
        model, stages.DeviceData.of(split.train, env.runtime), env.cfg, env.runtime,
        epochs=env.cfg.local_epochs, lr=env.cfg.lr, seed=env.seed("local"), lr_schedule=True,
    )
    test = stages.DeviceData.of(split.test, env.runtime)
    metrics = stages.classifier_metrics(model, test, split.test.num_classes, env.cfg, env.runtime)
    return _reply(msg, {NUM_EXAMPLES: len(split.test), PARTITION_ID: env.partition_id, SECONDS: time.perf_counter() - t0, **metrics})

