"""Gate ablation on a saved stage 1: each routing change alone and together, over seeds.

Stages 2-3 only (``extractor-checkpoint``), so every variant sees the same
extractor and head. The seed varies the partition, the experts, their
out-of-fold answers and the gate. Writes ``<output-dir>/<name>/ablation.md``
and ``ablation.json`` (mean ± std over seeds of NMoE's accuracy and macro-F1
on both test settings, the routing diagnostics, and the own expert, oracles
and router ceiling beside them). Chooses nothing by itself: defaults are
chosen on the training-set diagnostics (``train-*`` in rounds.csv), which
the table also shows.

    python scripts/gate_ablation.py --extractor outputs/paper-fe/extractor.pt --seeds 0 1 2
    python scripts/gate_ablation.py --extractor outputs/fedce-s0-le3-tau0.5/extractor.pt --set tau=0.5 --only 11

``--set "KEY=VALUE ..."`` (repeatable, as ``nmoe-run --set``) overrides run-config keys in every run,
e.g. the skew of a stage 1 trained at another ``tau``.

``--extractor`` may name one stage 1 per seed with ``{seed}``, e.g.
``outputs/fedce-s{seed}-avgm07/extractor.pt``: then seed s runs stages 2-3
on the extractor that stage 1 trained with seed s (the whole pipeline over
seeds). The first variant's runs also probe the extractor on the pooled data
(test sets; kNN, linear and MLP beside raw pixels and random init), and the
table gets those probes as well. A run folder that already holds a completed
run of the same extractor, seed and gate keys is reused, so an interrupted
ablation resumes where it stopped and a rerun only redraws the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nmoe_flwr.cli.flwr_process import merged_run_config
from nmoe_flwr.cli.reproduce import finished_with, fmt
from nmoe_flwr.cli.run import launch
from nmoe_flwr.config import ConfigError
from nmoe_flwr.workspace import output_root

PAPER = {
    "gate-method": "fedgate", "gate-rounds": 10, "gate-local-epochs": 2,
    "gate-noise": 1.0, "gate-route-weight": 0.0, "gate-logit-adjust": 0.0, "gate-stay-margin": 0.0,
}
"""The paper's gate (FedGate, mixture NLL only, routing noise of std 1.0), as session 1 ran it."""
ROUTES = {"gate-noise": 0.0, "gate-route-weight": 1.0, "gate-local-epochs": 5}
"""The three changes that first made the gate route (issue 10)."""
LONG = {"gate-rounds": 50, "gate-local-epochs": 1}
"""More, shorter rounds: less client drift between averagings (same data, more communication)."""
VARIANTS = {
    "paper (noise 1.0, NLL only, 2 local epochs)": PAPER,
    "no routing noise": PAPER | {"gate-noise": 0.0},
    "routing target (weight 1)": PAPER | {"gate-route-weight": 1.0},
    "5 local epochs": PAPER | {"gate-local-epochs": 5},
    "all three": PAPER | ROUTES,
    "all three, gate not shared (local)": PAPER | ROUTES | {"gate-method": "local"},
    "all three, target weight 0.5": PAPER | ROUTES | {"gate-route-weight": 0.5},
    "all three, target weight 2": PAPER | ROUTES | {"gate-route-weight": 2.0},
    "all three, 50 rounds x 1 epoch": PAPER | ROUTES | LONG,
    "all three, 50 x 1, logit-adjusted gate (FedGate)": PAPER | ROUTES | LONG | {"gate-logit-adjust": 1.0},
    "all three, 50 x 1, all layers averaged": PAPER | ROUTES | LONG | {"gate-method": "fedavg"},
    "all three, 50 x 1, all layers averaged + logit-adjusted (the default of issue 10)": (
        PAPER | ROUTES | LONG | {"gate-method": "fedavg", "gate-logit-adjust": 1.0}
    ),
    "... + stay margin 0.05 (the default since issue 11)": (
        PAPER | ROUTES | LONG | {"gate-method": "fedavg", "gate-logit-adjust": 1.0, "gate-stay-margin": 0.05}
    ),
}
"""Label -> run-config overrides, explicit, so that a change of defaults does not change a row."""


def as_overrides(values: dict) -> str:
    """``{"k": v}`` -> ``'k=v ...'`` in Flower's ``--run-config`` syntax (strings quoted)."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


COLUMNS = [
    ("nmoe", "accuracy"), ("nmoe", "macro-f1"), ("nmoe", "iid-accuracy"), ("nmoe", "iid-macro-f1"),
    ("nmoe", "routed-to-neighbour"), ("nmoe", "minority-to-owner"), ("nmoe", "dominant-sent-away"),
]
REFERENCES = ["personalized-expert", "router-ceiling", "oracle-class-owner", "oracle-best-expert"]
PROBES = ["knn-pooled-accuracy", "linear-pooled-accuracy", "mlp-pooled-accuracy"]


def last_gate_round(folder: Path) -> dict[str, float]:
    """The training-set routing diagnostics of the last gate round (rounds.csv)."""
    import csv

    rows = [r for r in csv.DictReader((folder / "rounds.csv").open()) if r["stage"] == "gate"]
    return {k: float(v) for k, v in rows[-1].items() if k.startswith("train-") and v}


def main(argv: list[str] | None = None) -> int:
    """Run every variant for every seed, then write the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extractor", required=True,
                        help="<run>/extractor.pt of a finished stage 1 (head.pt beside it); {seed} is replaced by the seed")
    parser.add_argument("--run-config", default="configs/paper.toml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--name", default="gate-ablation")
    parser.add_argument("--only", nargs="*", help="variant indices to run (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar='"KEY=VALUE ..."',
                        help="run-config overrides for every run (TOML values, as nmoe-run's --set), e.g. --set tau=0.5; repeatable")
    args = parser.parse_args(argv)
    try:
        fixed = merged_run_config(None, args.set)
    except ConfigError as exc:
        parser.error(f"--set: {exc}")
    root = output_root("")
    folder = root / args.name
    folder.mkdir(parents=True, exist_ok=True)
    missing = [p for p in {args.extractor.format(seed=s) for s in args.seeds} if not Path(p).is_file()]
    if missing:
        parser.error(f"no extractor at {', '.join(missing)}")

    def extractor(seed: int) -> str:
        return str(Path(args.extractor.format(seed=seed)).resolve())

    def base(seed: int) -> str:
        return f'extractor-checkpoint="{extractor(seed)}" local-baseline=false centralized-baseline=false'

    table: dict[str, dict] = {}
    variants = list(VARIANTS.items())
    if args.only:
        variants = [variants[int(i)] for i in args.only]
    for label, overrides in variants:
        runs = []
        for seed in args.seeds:
            name = f"{args.name}-{list(VARIANTS).index(label)}-s{seed}"
            print(f"\n=== {label}, seed {seed} ===", flush=True)
            # The probes and router ceiling depend on the extractor and the seed only: once per seed.
            probe = not table
            expected = {"seed": seed, "extractor-checkpoint": extractor(seed), "pooled-probe": probe, **fixed, **overrides}
            if finished_with(root / name / "results.json", **expected):
                print(f"reusing {root / name} (completed, same extractor, seed and gate keys)", flush=True)
            else:
                status, record = launch(Path("."), args.run_config, overrides=[
                    base(seed), f"pooled-probe={json.dumps(probe)}", f'seed={seed} run-name="{name}"',
                    as_overrides(fixed | overrides),
                ])
                if status != "finished:completed":
                    print(f"{label}, seed {seed}: {status} {record.get('status-details', '')}", file=sys.stderr)
                    return 1
            data = json.loads((root / name / "results.json").read_text())
            runs.append({"results": data["results"], "train": last_gate_round(root / name),
                         "probes": data["stages"].get("pooled-probe", {})})
        table[label] = {"overrides": overrides, "runs": runs}
    (folder / "ablation.json").write_text(json.dumps(table, indent=2))
    lines = [
        "| variant | " + " | ".join(f"{m} {k}" for m, k in COLUMNS) + " | train minority-to-owner |",
        "|---" * (len(COLUMNS) + 2) + "|",
    ]
    for label, entry in table.items():
        cells = [fmt([r["results"][m]["mean"][k] for r in entry["runs"]]) for m, k in COLUMNS]
        train = fmt([r["train"].get("train-minority-to-owner", float("nan")) for r in entry["runs"]])
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {train} |")
    lines += ["", "| reference (first variant's runs) | accuracy | macro-F1 | IID accuracy | IID macro-F1 |", "|---|---|---|---|---|"]
    first = next(iter(table.values()))["runs"]
    for ref in REFERENCES:
        if all(ref in r["results"] for r in first):
            cells = [fmt([r["results"][ref]["mean"][k] for r in first]) for k in ("accuracy", "macro-f1", "iid-accuracy", "iid-macro-f1")]
            lines.append(f"| {ref} | " + " | ".join(cells) + " |")
    if all(r["probes"] for r in first):
        features = [f for f in first[0]["probes"] if isinstance(first[0]["probes"][f], dict)]
        lines += ["", "| pooled probe, test sets (first variant's runs) | kNN | linear | MLP |", "|---|---|---|---|"]
        for f in features:
            lines.append(f"| {f} | " + " | ".join(fmt([r["probes"][f][k] for r in first]) for k in PROBES) + " |")
    md = "\n".join(lines)
    (folder / "ablation.md").write_text(md + "\n")
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
