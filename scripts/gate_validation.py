"""Choose gate settings on held-out training data, in seconds, without Flower.

Reads the client stores of a finished NMoE run (``<run>/clients/<id>/``:
data split, cached latents, expert bank, out-of-fold answers of the own
expert), holds out ``--val-share`` of every client's training samples,
trains the gates on the rest exactly as stage 3 does (the project's
``algorithms.gate.train_gate``; the server's part is a weighted mean of the
entries ``gate-method`` shares, as :class:`~nmoe_flwr.strategies.PartialFedAvg`
computes it) and scores NMoE on the held-out samples, with the own expert's
column cross-fitted as in training. The test sets are not read: settings
chosen on this table have not seen them.

    python scripts/gate_validation.py outputs/<run> gate-method=fedavg gate-logit-adjust=1.0 gate-rounds=50 gate-local-epochs=1
    python scripts/gate_validation.py --seed 0 1 2 -- outputs/<run> gate-stay-margin=0.05

Prints one JSON line: the overrides and the mean over clients of accuracy,
macro-F1 and the routing diagnostics of NMoE and of the own expert alone
(with several ``--seed``: averaged over the splits, and each split beside).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import tomllib
import torch

from nmoe_flwr.algorithms import gate as gates
from nmoe_flwr.algorithms.experts import frozen_bank
from nmoe_flwr.algorithms.routing import class_owners, routing_diagnostics
from nmoe_flwr.algorithms.seeding import derive_seed, generator
from nmoe_flwr.algorithms.training import (
    Runtime,
    classification_metrics,
    resolve_runtime,
    set_torch_threads,
)
from nmoe_flwr.cli.plain_fedce import weighted_mean
from nmoe_flwr.client_state import ClientStore
from nmoe_flwr.config import parse_run_config
from nmoe_flwr.pipelines.nmoe import GATE_SHARED_PREFIXES


def client_arrays(store: ClientStore, pid: int, mlp_hidden: int, runtime: Runtime) -> dict:
    """``latents``, ``labels`` and bank ``probs`` of one client's training samples, read
    once; the own expert's column holds its out-of-fold answers."""
    split = store.load_splits()
    num_classes = split.train.num_classes
    stored = store.bank()
    bank = frozen_bank(stored, max(stored) + 1, mlp_hidden, num_classes, runtime)
    if any(e is None for e in bank):
        raise SystemExit(f"{store.folder}: the expert bank lacks experts (a faulted run); use a complete run")
    latents, labels = store.latents("train"), split.train.labels
    probs = gates.bank_probs(bank, latents)
    own = store.own_oof()
    if own is None:
        raise SystemExit(f"{store.folder}: no out-of-fold answers (run with gate-oof-folds > 1)")
    probs[:, pid] = own
    return {"latents": latents, "labels": labels, "probs": probs, "num_classes": num_classes}


def held_out_split(arrays: dict, pid: int, val_share: float, seed: int) -> dict:
    """``arrays`` (:func:`client_arrays`) split into ``train`` and ``val`` tuples
    ``(latents, labels, probs)``, seeded by ``seed`` and the client."""
    labels = arrays["labels"]
    order = torch.randperm(labels.shape[0], generator=generator(derive_seed(seed, pid, "val")))
    held = int(val_share * labels.shape[0])
    pick = lambda rows: (arrays["latents"][rows], labels[rows], arrays["probs"][rows])
    return {"val": pick(order[:held]), "train": pick(order[held:]), "num_classes": arrays["num_classes"]}


def held_out_scores(arrays: list[dict], cfg, val_share: float, seed: int, runtime: Runtime) -> dict[str, float]:
    """Train the gates on every client's training part of one seeded split, as
    stage 3 does; return the mean over clients of the held-out scores."""
    n = cfg.num_clients
    clients = [held_out_split(a, pid, val_share, seed) for pid, a in enumerate(arrays)]
    prefixes = GATE_SHARED_PREFIXES[cfg.gate_method]
    models = [gates.new_gate(cfg.mlp_hidden, n, derive_seed(cfg.seed, "gate-init")) for _ in range(n)]
    shared = {k: v.clone() for k, v in models[0].state_dict().items() if k.startswith(prefixes)}
    sizes = [c["train"][1].shape[0] for c in clients]
    for rnd in range(1, cfg.gate_rounds + 1):
        replies = []
        for pid, (model, client) in enumerate(zip(models, clients)):
            model.load_state_dict(shared, strict=False)
            gates.train_gate(model, *client["train"], cfg, runtime, server_round=rnd, num_rounds=cfg.gate_rounds,
                             seed=derive_seed(cfg.seed, pid, "gate", rnd), own=pid)
            replies.append({k: v for k, v in model.state_dict().items() if k in shared})
        shared = weighted_mean(replies, sizes) if shared else shared
        print(f"split {seed}: gate round {rnd}/{cfg.gate_rounds}", file=sys.stderr, flush=True)
    rows = []
    owners = class_owners(n, clients[0]["num_classes"]) if cfg.partition == "dominant" else None
    for pid, (model, client) in enumerate(zip(models, clients)):
        model.load_state_dict(shared, strict=False)
        latents, labels, probs = client["val"]
        with torch.no_grad():
            top1 = model.eval()(latents).argmax(1)
        rows_idx = torch.arange(labels.shape[0])
        c = client["num_classes"]
        row = classification_metrics(probs[rows_idx, top1].argmax(1), labels, c)
        if owners is not None:
            row |= routing_diagnostics(top1, labels, pid, owners, c)
        row |= {f"own-expert-{k}": v for k, v in classification_metrics(probs[:, pid].argmax(1), labels, c).items()}
        rows.append(row)
    return {k: statistics.fmean(r[k] for r in rows if k in r) for k in rows[0]}


def main(argv: list[str] | None = None) -> int:
    """Train the gates on every client's training part, score NMoE on its held-out part."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="folder of a finished NMoE run (with clients/<id>/)")
    parser.add_argument("overrides", nargs="*", help="key=value run-config overrides (TOML values)")
    parser.add_argument("--val-share", type=float, default=0.2)
    parser.add_argument("--seed", type=int, nargs="+", default=[0],
                        help="seeds of the held-out split; several: the scores are averaged over the splits")
    args = parser.parse_args(argv)
    raw = json.loads((args.run / "results.json").read_text())["config"]
    for item in args.overrides:
        key, _, value = item.partition("=")
        raw[key] = tomllib.loads(f"v = {value}")["v"]
    cfg = parse_run_config(raw)
    set_torch_threads(1)
    runtime = resolve_runtime("cpu", "off", False)
    arrays = [client_arrays(ClientStore(args.run / "clients" / str(pid)), pid, cfg.mlp_hidden, runtime)
              for pid in range(cfg.num_clients)]
    splits = [held_out_scores(arrays, cfg, args.val_share, seed, runtime) for seed in args.seed]
    mean = {k: round(statistics.fmean(s[k] for s in splits), 4) for k in splits[0]}
    line = {"run": str(args.run), "overrides": args.overrides, "val-share": args.val_share, "splits": args.seed, "val": mean}
    if len(splits) > 1:  # the spread over splits says how much of a difference is the split's noise
        line["val-per-split"] = [{k: round(v, 4) for k, v in s.items()} for s in splits]
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
