"""Where a deployment round's seconds go, against the same round in simulation (issue 13.1).

Measured in one run, on one machine, for one preset (``configs/deploy-smoke.toml``):

1. ``nmoe-run`` (simulation, Ray): the ServerApp's FedCE seconds per round;
2. the loopback deployment (``nmoe-deploy-loopback``'s SuperLink and
   SuperNodes, TLS, authentication): the same, plus every FedCE message's
   timeline from the clients' ``timeline.jsonl`` (:mod:`nmoe_flwr.timeline`):
   server creates the message -> ClientApp process starts (SuperNode pull
   and SuperExec spawn) -> this package starts importing (Flower's start-up
   in the process: Python, flwr, pull, FAB install) -> imports done (torch,
   the app) -> handler ends (our work) -> the next round's messages are
   created (reply push, SuperLink, ServerApp pull, aggregation, and the
   wait for the slowest node);
3. optionally the deployment again with each variant of ``--env`` (e.g.
   ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1``, Flower's SuperExec poll).

Prints the median of each segment over the FedCE messages, round times and
the ratio deployment / simulation::

    python benchmarks/deploy_timeline.py --env FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from nmoe_flwr.cli.deploy_loopback import deploy
from nmoe_flwr.cli.flwr_process import merged_run_config
from nmoe_flwr.cli.run import launch
from nmoe_flwr.timeline import TIMELINE_FILE, read_timeline

ROOT = Path(__file__).resolve().parents[1]

FEDCE = "train.fedce"
SEGMENTS = {
    "SuperNode pull + spawn": ("created", "process-start"),
    "Flower start-up in the process (Python, flwr, pull, FAB)": ("process-start", "package-import"),
    "our imports (torch, app)": ("package-import", "imported"),
    "our handler (data + training)": ("imported", "handler-end"),
}
REPLY = "reply -> next round sent (push, pull, aggregation, slowest node)"


def fedce_breakdown(lines: list[dict]) -> dict[str, float]:
    """Median seconds of each segment over the FedCE messages of all clients, and of the reply leg."""
    fedce = [line for line in lines if line["message-type"] == FEDCE and line.get("process-start")]
    out = {name: statistics.median(line[b] - line[a] for line in fedce) for name, (a, b) in SEGMENTS.items()}
    by_round: dict[int, list[dict]] = {}
    for line in fedce:
        by_round.setdefault(line["round"], []).append(line)
    legs = [min(x["created"] for x in by_round[r + 1]) - max(x["handler-end"] for x in by_round[r])
            for r in sorted(by_round) if r + 1 in by_round]
    if legs:
        out[REPLY] = statistics.median(legs)
    return out


def seconds_per_round(results: Path) -> float:
    """FedCE seconds per round of a finished run (the ServerApp's own timing)."""
    data = json.loads(results.read_text())
    return data["timings-s"]["stage1-fedce"] / data["config"]["fedce-rounds"]


def main(argv: list[str] | None = None) -> int:
    """Run simulation and deployment(s), print the breakdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=str(ROOT / "configs" / "deploy-smoke.toml"))
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="a deployment variant with this environment (repeatable: one variant each)")
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: a temporary folder)")
    args = parser.parse_args(argv)
    run_name = str(merged_run_config(args.preset).get("run-name", "deploy-smoke"))
    with tempfile.TemporaryDirectory(prefix="deploy-timeline-") as tmp:
        work = args.workdir or Path(tmp)
        print("=== simulation ===", flush=True)
        status, _ = launch(ROOT, args.preset, num_supernodes=args.nodes,
                           extra_env={"NMOE_OUTPUT_DIR": str(work / "sim")})
        if status != "finished:completed":
            print(f"simulation: {status}", file=sys.stderr)
            return 1
        sim = seconds_per_round(work / "sim" / run_name / "results.json")
        rows = []
        for variant in ["", *args.env]:
            env = dict([variant.split("=", 1)]) if variant else {}
            print(f"=== deployment {variant or '(defaults)'} ===", flush=True)
            folder = work / f"deploy-{len(rows)}"
            outcome = deploy(ROOT, args.preset, args.nodes, folder, extra_env=env)
            if outcome.get("status") != "finished:completed":
                print(f"deployment {variant}: {outcome}", file=sys.stderr)
                return 1
            lines = [line for i in range(args.nodes)
                     for line in read_timeline(folder / f"node-{i}" / run_name / "clients" / str(i) / TIMELINE_FILE)]
            rows.append((variant or "defaults", outcome["stage1-seconds-per-round"], fedce_breakdown(lines)))
    names = [*SEGMENTS, REPLY]
    print(f"\n{args.preset}, {args.nodes} nodes: FedCE round in simulation {sim:.1f} s\n")
    print("| deployment | round (s) | x simulation | " + " | ".join(names) + " |")
    print("|---" * (3 + len(names)) + "|")
    for variant, per_round, parts in rows:
        print(f"| {variant} | {per_round:.1f} | {per_round / sim:.1f} | "
              + " | ".join(f"{parts.get(n, float('nan')):.1f}" for n in names) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
