"""``nmoe-compare-alignment``: every assignment rule on the same seeds and data, one table.

Runs the alignment preset once per rule and seed through ``nmoe-run``, as
run folders ``<output-dir>/<name>-<rule>-s<seed>``. Per seed, the first run
trains the stage-1 extractor and the others reuse it
(``extractor-checkpoint``), so every rule of a seed starts from the same
frozen extractor and data. ``--slacks`` adds ``optimal`` at other per-expert
load caps (``load-cap-slack``; rows ``optimal-slack<s>``). A run folder whose
``results.json`` is a finished run of the same seed, rule and slack is
reused, so an interrupted sweep picks up where it stopped. Writes
``<output-dir>/<name>/``:

- ``comparison.md``: every rule's final and best accuracy, rounds and
  simulated seconds to the target, load CV and bytes, mean ± sample std over
  the seeds (one table per seed below it);
- ``comparison.json``: the per-seed summaries behind it;
- ``accuracy.png``: accuracy per round, mean over the seeds, one line per rule;

and keeps each run's own folder with its assignment heatmap.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..algorithms.alignment import RULES
from ..pipelines.plots import accuracy_curves
from ..workspace import output_root
from .flwr_process import checked_run_config
from .reproduce import finished_with, fmt
from .run import launch


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "not reached" if spec == "rounds" else "-"
    return format(value, spec) if spec != "rounds" else str(value)


def table(rows: list[dict]) -> str:
    """Markdown table of the per-rule summaries of one seed."""
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


def variants(rules: Sequence[str], slacks: Sequence[float]) -> dict[str, tuple[str, float]]:
    """Row label -> (assignment rule, load-cap slack).

    Every rule runs at slack 1 (the cap ``ceil(sum c_i / E)``) under its own
    name; ``optimal``, the one rule the cap binds, also runs at each other
    slack of ``slacks`` as ``optimal-slack<s>``.
    """
    out = {rule: (rule, 1.0) for rule in rules}
    if "optimal" in rules:
        out |= {f"optimal-slack{s:g}": ("optimal", float(s)) for s in slacks if float(s) != 1.0}
    return out


def seeds_table(per_seed: Mapping[str, Sequence[Mapping]]) -> str:
    """Markdown: one row per rule, ``mean ± std`` over its seeds' summaries.

    Rounds and simulated seconds to the target are averaged over the seeds
    that reached it, and the column says how many did (``k/n``).
    """
    lines = [
        "| assignment | final accuracy | best accuracy | reached target | rounds to target | simulated s to target | simulated s total | load CV | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, runs in per_seed.items():
        reached = [r for r in runs if r["rounds-to-target"] is not None]
        cells = [
            fmt([r["final-accuracy"] for r in runs]), fmt([r["best-accuracy"] for r in runs]),
            f"{len(reached)}/{len(runs)}", fmt([r["rounds-to-target"] for r in reached]),
            fmt([r["sim-seconds-to-target"] for r in reached]), fmt([r["sim-seconds-total"] for r in runs]),
            fmt([r["load-cv"] for r in runs]),
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {len(runs)} |")
    return "\n".join(lines)


def mean_curve(curves: Sequence[Mapping[int, float]]) -> dict[int, float]:
    """Per round, the mean accuracy over the runs that report that round."""
    rounds = sorted({r for c in curves for r in c})
    return {r: statistics.fmean(c[r] for c in curves if r in c) for r in rounds}


def finished(results: Path, seed: int, rule: str, slack: float) -> bool:
    """Whether ``results`` is a completed run of this seed, rule and slack (so it is reused)."""
    return finished_with(results, seed=seed, assignment=rule, **{"load-cap-slack": slack})


def _numbers(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    """Run every rule (and slack) on every seed, reusing finished runs, and write the comparison."""
    parser = argparse.ArgumentParser(prog="nmoe-compare-alignment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-config", default="configs/alignment.toml", help="alignment preset (TOML)")
    parser.add_argument("--set", action="append", default=[], help='extra "key=value ..." overrides for every run')
    parser.add_argument("--rules", default=",".join(RULES), help=f"comma-separated subset of {','.join(RULES)}")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0; e.g. 0,1,2)")
    parser.add_argument("--slacks", default="1", help="load-cap-slack values for optimal (default 1; e.g. 1,1.5,2)")
    parser.add_argument("--app", type=Path, default=Path("."))
    parser.add_argument("--flwr-home", type=Path, help="where launches keep their state: each gets its own FLWR_HOME under <this>/launches/ (default: <app>/.flwr)")
    args = parser.parse_args(argv)

    rules = args.rules.split(",")
    unknown = sorted(set(rules) - set(RULES))
    if unknown:
        parser.error(f"unknown rule(s) {unknown}; valid: {', '.join(RULES)}")
    slacks = _numbers(args.slacks)
    if any(s < 1 for s in slacks):
        parser.error(f"--slacks {args.slacks}: every load-cap slack must be >= 1 (the cap is ceil(slack * sum c_i / E))")
    seeds = [int(s) for s in _numbers(args.seeds)]
    base = checked_run_config(parser.prog, args.app, args.run_config, args.set)
    root = output_root(str(base.get("output-dir", "")))
    name = str(base.get("run-name") or "alignment")
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    env = {"NMOE_OUTPUT_DIR": str(root)}
    rows = variants(rules, slacks)
    per_seed: dict[str, list[dict]] = {label: [] for label in rows}
    curves: dict[str, list[dict[int, float]]] = {label: [] for label in rows}
    total, done = len(seeds) * len(rows), 0
    for seed in seeds:
        checkpoint = str(base.get("extractor-checkpoint", ""))  # given: every run uses it
        for label, (rule, slack) in rows.items():
            done += 1
            run_name = f"{name}-{label}-s{seed}"
            path = root / run_name / "results.json"
            if finished(path, seed, rule, slack):
                print(f"[{done}/{total}] {run_name}: finished earlier, reused", flush=True)
            else:
                overrides = [*args.set, f'seed={seed} assignment="{rule}" load-cap-slack={slack} run-name="{run_name}"']
                if checkpoint:
                    overrides.append(f'extractor-checkpoint="{checkpoint}"')
                print(f"\n=== [{done}/{total}] seed {seed}, {label} -> {root / run_name} ===", flush=True)
                status, record = launch(args.app, args.run_config, flwr_home=args.flwr_home, extra_env=env, overrides=overrides)
                if status != "finished:completed":
                    print(f"{run_name}: run {status}: {record.get('status-details', '')}", file=sys.stderr)
                    return 1
            stage = json.loads(path.read_text())["stages"]["alignment"]
            per_seed[label].append(stage["summary"] | {"assignment": label, "seed": seed})
            curves[label].append({int(r): v["accuracy"] for r, v in stage["rounds"].items()})
            checkpoint = checkpoint or str(root / run_name / "extractor.pt")
    target = next(iter(per_seed.values()))[0]["target-accuracy"]
    md = (f"Seeds {', '.join(map(str, seeds))} (mean ± sample std over seeds)\n\n{seeds_table(per_seed)}\n\n"
          + "\n\n".join(f"Seed {seed}\n\n{table([runs[i] for runs in per_seed.values()])}" for i, seed in enumerate(seeds)))
    (folder / "comparison.md").write_text(md + "\n")
    (folder / "comparison.json").write_text(json.dumps(per_seed, indent=2, default=str))
    accuracy_curves({label: mean_curve(c) for label, c in curves.items()}, folder / "accuracy.png", target)
    print("\n" + md)
    print(f"\nWrote {folder / 'comparison.md'}, comparison.json and accuracy.png; "
          f"heatmaps in {root}/{name}-<rule>-s<seed>/assignment_heatmap.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
