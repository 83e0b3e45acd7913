"""NMoE under client drop-outs: one run per (drop rate, seed), one table (README "Reliability").

Runs a preset through ``nmoe-run`` with ``fault-drop-rate`` in ``--rates``
(every client fails each training round with that probability, seeded) and
prints, per rate, NMoE's final accuracy and macro-F1 (mean ± std over the
seeds), the personalized expert alone, how many training replies were lost
and how many experts. Baselines and pooled probes are off: they do not see
the faults. A run folder that completed with the same config is reused.

    python scripts/fault_sweep.py --run-config configs/faults.toml --rates 0,0.1,0.3 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nmoe_flwr.cli.flwr_process import merged_run_config
from nmoe_flwr.cli.reproduce import finished_with, fmt
from nmoe_flwr.cli.run import launch
from nmoe_flwr.workspace import output_root


def main(argv: list[str] | None = None) -> int:
    """Run the sweep and print the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-config", default="configs/faults.toml")
    parser.add_argument("--rates", default="0,0.1,0.3")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--name", default="faults")
    args = parser.parse_args(argv)
    root = output_root("")
    rows = []
    for rate in (float(r) for r in args.rates.split(",")):
        runs = []
        for seed in (int(s) for s in args.seeds.split(",")):
            name = f"{args.name}-drop{rate:g}-s{seed}"
            print(f"\n=== fault-drop-rate {rate:g}, seed {seed} ===", flush=True)
            overrides = (f'fault-drop-rate={rate} seed={seed} run-name="{name}" '
                         "local-baseline=false centralized-baseline=false pooled-probe=false")
            results = root / name / "results.json"
            if finished_with(results, **merged_run_config(args.run_config, [overrides])):
                print(f"{name}: finished earlier with this config, reused", flush=True)
            else:
                status, record = launch(Path("."), args.run_config, overrides=[overrides])
                if status != "finished:completed":
                    print(f"{name}: {status} {record.get('status-details', '')}", file=sys.stderr)
                    return 1
            runs.append(json.loads(results.read_text()))
        lost = [sum(len(v) for st in ("fedce", "gate") for v in r["stages"][st].get("missing-replies", {}).values())
                for r in runs]
        total = [r["config"]["num-clients"] * (r["config"]["fedce-rounds"] + r["config"]["gate-rounds"]) for r in runs]
        rows.append(
            f"| {rate:g} | {fmt([r['results']['nmoe']['mean']['accuracy'] for r in runs])} "
            f"| {fmt([r['results']['nmoe']['mean']['macro-f1'] for r in runs])} "
            f"| {fmt([r['results']['personalized-expert']['mean']['macro-f1'] for r in runs])} "
            f"| {sum(lost)}/{sum(total)} | {sum(len(r['stages']['experts'].get('missing', {})) for r in runs)}"
            f"/{sum(r['config']['num-clients'] for r in runs)} |"
        )
    print("\n| fault-drop-rate | NMoE accuracy | NMoE macro-F1 | expert alone macro-F1 | training replies lost "
          "(FedCE + gate) | experts lost |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
