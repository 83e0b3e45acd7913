"""``nmoe-compare-alignment``: every assignment rule on the same seed and data, one table.

Runs the alignment preset once per rule through ``nmoe-run``. The first run
trains the stage-1 extractor; the others reuse it (``extractor-checkpoint``),
so all rules start from the same frozen extractor and the same seed. Writes
``<output-dir>/<name>/comparison.md``, ``comparison.json`` and
``accuracy.png`` (all rules), and keeps each rule's own run folder with its
assignment heatmap.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ..algorithms.alignment import RULES
from ..config import ConfigError
from ..pipelines.plots import accuracy_curves
from ..workspace import output_root
from .flwr_process import merged_run_config, validated_run_config
from .run import launch


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "not reached" if spec == "rounds" else "-"
    return format(value, spec) if spec != "rounds" else str(value)


def table(rows: list[dict]) -> str:
    """Markdown table of the per-rule summaries."""
    lines = [
        "| assignment | final accuracy | best accuracy | rounds to target | simulated s to target | simulated s total | load CV | MB sent |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['assignment']} | {_fmt(r['final-accuracy'], '.4f')} | {_fmt(r['best-accuracy'], '.4f')} "
            f"| {_fmt(r['rounds-to-target'], 'rounds')} | {_fmt(r['sim-seconds-to-target'], '.1f')} "
            f"| {r['sim-seconds-total']:.1f} | {r['load-cv']:.3f} | {r['bytes-total'] / 1e6:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run all rules and write the comparison."""
    parser = argparse.ArgumentParser(prog="nmoe-compare-alignment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-config", default="configs/alignment.toml", help="alignment preset (TOML)")
    parser.add_argument("--set", action="append", default=[], help='extra "key=value ..." overrides for every run')
    parser.add_argument("--rules", default=",".join(RULES), help=f"comma-separated subset of {','.join(RULES)}")
    parser.add_argument("--app", type=Path, default=Path("."))
    parser.add_argument("--flwr-home", type=Path, help="FLWR_HOME (default: <app>/.flwr)")
    args = parser.parse_args(argv)

    base = merged_run_config(args.run_config, args.set)
    try:  # a bad key or value fails here, naming it, before the first of several runs starts
        validated_run_config(args.app.resolve(), base)
    except ConfigError as exc:
        print(f"nmoe-compare-alignment: {exc}", file=sys.stderr)
        return 2
    root = output_root(str(base.get("output-dir", "")))
    name = str(base.get("run-name") or "alignment")
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    env = {"NMOE_OUTPUT_DIR": str(root)}
    checkpoint = str(base.get("extractor-checkpoint", ""))  # given: every rule uses it
    rows, curves = [], {}
    for rule in args.rules.split(","):
        run_name = f"{name}-{rule}"
        overrides = [*args.set, f'assignment="{rule}" run-name="{run_name}"']
        if checkpoint:
            overrides.append(f'extractor-checkpoint="{checkpoint}"')
        print(f"\n=== assignment = {rule} ===", flush=True)
        status, record = launch(args.app, args.run_config, flwr_home=args.flwr_home, extra_env=env, overrides=overrides)
        if status != "finished:completed":
            print(f"{rule}: run {status}: {record.get('status-details', '')}", file=sys.stderr)
            return 1
        results = json.loads((root / run_name / "results.json").read_text())
        summary = results["stages"]["alignment"]["summary"]
        rows.append(summary)
        curves[rule] = {int(r): v["accuracy"] for r, v in results["stages"]["alignment"]["rounds"].items()}
        checkpoint = checkpoint or str(root / run_name / "extractor.pt")
    md = table(rows)
    (folder / "comparison.md").write_text(md + "\n")
    (folder / "comparison.json").write_text(json.dumps(rows, indent=2, default=str))
    accuracy_curves(curves, folder / "accuracy.png", rows[0]["target-accuracy"])
    print("\n" + md)
    print(f"\nWrote {folder / 'comparison.md'}, comparison.json and accuracy.png; "
          f"heatmaps in {root}/{name}-<rule>/assignment_heatmap.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
