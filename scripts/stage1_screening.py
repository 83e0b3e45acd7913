"""Screen stage-1 variants that are not run-config options, on the held-out pooled probes.

Runs ``scripts/extractor_validation.py`` (FedCE in one plain process, pooled
kNN/linear/MLP probes on held-out training data) with one change made in
this process only:

- ``--group-norm N``: GroupNorm with N groups instead of every BatchNorm of the
  ResNet20 (BatchNorm under label skew is a known failure, Hsieh et al. 2020);
- ``--frozen-classifier``: the head's last layer frozen at its initialisation
  during FedCE (FedBABU, Oh et al. 2022).

These lost or tied against the default (README, "Stage 1 under skew"), so they
did not become options; this script is how those rows were made.

    python scripts/stage1_screening.py --group-norm 2 --preset configs/paper.toml
    python scripts/stage1_screening.py --frozen-classifier --preset configs/paper.toml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch import nn


def main(argv: list[str] | None = None) -> int:
    """Apply the variant, then hand the remaining arguments to extractor_validation."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group-norm", type=int, metavar="GROUPS", help="GroupNorm with this many groups")
    parser.add_argument("--frozen-classifier", action="store_true", help="freeze the head's last layer (FedBABU)")
    args, rest = parser.parse_known_args(argv)
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
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import extractor_validation

    return extractor_validation.main(rest)


if __name__ == "__main__":
    sys.exit(main())
