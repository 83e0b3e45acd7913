"""Screen stage-1 variants that are not run-config options, on the held-out pooled probes.

Runs ``scripts/extractor_validation.py`` (FedCE in one plain process, pooled
kNN/linear/MLP probes on held-out training data) with one change made in
this process only:

- ``--group-norm N``: GroupNorm with N groups instead of every BatchNorm of the
  ResNet20 (BatchNorm under label skew is a known failure, Hsieh et al. 2020);
- ``--frozen-classifier``: the head's last layer frozen at its initialisation
  during FedCE (FedBABU, Oh et al. 2022);
- ``--scaffold``: SCAFFOLD's control variates on the averaged weights
  (:class:`Scaffold`, Karimireddy et al. 2020).

These lost or tied against the default (README, "Stage 1: what else was
tried"), so they did not become options; this script is how those rows were
made.

    python scripts/stage1_screening.py --group-norm 2 --preset configs/paper.toml
    python scripts/stage1_screening.py --frozen-classifier --preset configs/paper.toml
    python scripts/stage1_screening.py --scaffold --preset configs/paper.toml
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn


class Scaffold:
    """SCAFFOLD's control variates for a loop that trains the clients of a round one after another.

    Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for
    Federated Learning", ICML 2020, Alg. 1: every local gradient of client
    ``i`` is corrected by ``c - c_i``, where ``c_i`` estimates the client's
    mean gradient and ``c`` the mean over clients, so that each local step
    follows the federation's gradient rather than the client's. Two
    choices of ours: ``c_i`` is the mean of the (uncorrected) gradients the
    client computed in its last round, which is the paper's option II for
    plain SGD (``c_i+ = c_i - c + (x - y) / (K lr)``) and stays right under
    momentum SGD, where the displacement ``x - y`` is no longer ``K lr``
    times the mean step; and every client takes part in every round, so
    ``c`` is the plain mean of the ``c_i`` (the paper's update with
    ``|S| = N``). Both start at zero: the first round is FedAvg.
    """

    def __init__(self, num_clients: int) -> None:
        self.num_clients = num_clients
        self.client_cv: list[dict[str, torch.Tensor]] = [{} for _ in range(num_clients)]
        self.global_cv: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def client(self, pid: int, params: dict[str, nn.Parameter]) -> Iterator[None]:
        """Correct every gradient of ``params`` by ``c - c_i`` while the block trains
        client ``pid``; on exit, ``c_i`` becomes the mean uncorrected gradient of the block."""
        sums = {n: torch.zeros_like(p) for n, p in params.items()}
        steps = {n: 0 for n in params}

        def hook_for(name: str):
            def hook(p: nn.Parameter) -> None:
                sums[name] += p.grad
                steps[name] += 1
                if name in self.global_cv:
                    p.grad += self.global_cv[name] - self.client_cv[pid][name]
            return hook

        handles = [p.register_post_accumulate_grad_hook(hook_for(n)) for n, p in params.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        self.client_cv[pid] = {n: sums[n] / max(steps[n], 1) for n in params}

    def end_round(self) -> None:
        """``c`` <- mean of the clients' ``c_i`` (every client trained this round)."""
        names = self.client_cv[0].keys()
        self.global_cv = {n: torch.stack([cv[n] for cv in self.client_cv]).mean(0) for n in names}


def main(argv: list[str] | None = None) -> int:
    """Apply the variant, then hand the remaining arguments to extractor_validation."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group-norm", type=int, metavar="GROUPS", help="GroupNorm with this many groups")
    parser.add_argument("--frozen-classifier", action="store_true", help="freeze the head's last layer (FedBABU)")
    parser.add_argument("--scaffold", action="store_true", help="SCAFFOLD control variates on the averaged weights")
    args, rest = parser.parse_known_args(argv)
    if args.scaffold and args.frozen_classifier:
        parser.error("--scaffold and --frozen-classifier each replace FedCE's local step: choose one")
    if args.group_norm:
        from nmoe_flwr.algorithms import models

        groups = args.group_norm

        class GroupNorm(nn.GroupNorm):
            def __init__(self, channels: int) -> None:
                super().__init__(groups, channels)

        # models.py builds its norms as nn.BatchNorm2d: give that module a namespace whose BatchNorm2d is GroupNorm.
        models.nn = type("nn", (), {**{k: getattr(nn, k) for k in dir(nn) if not k.startswith("__")},
                                    "BatchNorm2d": GroupNorm})
    if args.frozen_classifier:
        import nmoe_flwr.cli.plain_fedce as plain

        train = plain.train_classifier

        def train_frozen(model, *a, **k):
            for p in model.head.net[-1].parameters():
                p.requires_grad_(False)  # make_optimizers skips it; it never leaves its initialisation
            return train(model, *a, **k)

        plain.train_classifier = train_frozen
    if args.scaffold:
        import nmoe_flwr.cli.plain_fedce as plain

        train, calls = plain.train_classifier, 0
        scaffold: Scaffold | None = None

        def train_scaffold(model, data, cfg, *a, shared_prefixes=(), **k):
            # fedce_plain trains clients 0..N-1 in order, every round: the call count names the client.
            nonlocal scaffold, calls
            scaffold = scaffold or Scaffold(cfg.num_clients)
            pid = calls % cfg.num_clients
            params = {n: p for n, p in model.named_parameters() if p.requires_grad and n.startswith(tuple(shared_prefixes))}
            with scaffold.client(pid, params):
                stats = train(model, data, cfg, *a, shared_prefixes=shared_prefixes, **k)
            calls += 1
            if pid == cfg.num_clients - 1:
                scaffold.end_round()
            return stats

        plain.train_classifier = train_scaffold
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import extractor_validation

    return extractor_validation.main(rest)


if __name__ == "__main__":
    sys.exit(main())
