"""``nmoe-reproduce``: the paper preset over seeds and over the skew tau, as tables and plots.

Runs the preset once per seed (``--seeds``, at the preset's tau) and once per
extra tau (``--taus``, at ``--tau-seed``) through ``nmoe-run``'s launcher,
each as its own run folder ``<output-dir>/<name>-s<seed>-tau<tau>``, then
writes into ``<output-dir>/<name>/``:

- ``seeds.md``: every method's accuracy and macro-F1 on both test settings
  (same-distribution and IID) and NMoE's routed share, mean ± std over the
  seeds (sample standard deviation), then the pooled kNN / linear / MLP probes
  of the stage-1 extractor beside raw pixels and the random-init ResNet20;
- ``tau.md``: the same per tau, one seed (an anecdote, and labelled so),
  from every finished run folder of ``--tau-seed`` under this ``--name``
  (also those of earlier invocations with other ``--taus``), when there is one;
- ``macro_f1_vs_tau.png`` (macro-F1 of every method against tau) and
  ``routed_vs_tau.png`` (share of samples NMoE sends to a neighbour), when
  two or more taus finished;
- ``reproduce.json``: the numbers behind all of it.

A run folder whose ``results.json`` says ``completed`` with the same seed
and tau is reused, not rerun, and the tables can be redrawn with
``--tables-only``. A run that was killed part-way (``kill``, a session's end,
a crash) with the same config is resumed from its per-round checkpoints
(as ``nmoe-run --resume`` does), so a reproduction longer than one sitting
adds up over several invocations.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from glob import escape as glob_escape
from pathlib import Path

from ..constants import ACCURACY, IID_PREFIX, MACRO_F1, ROUTED_TO_NEIGHBOUR
from ..workspace import output_root

# Columns of the tables: (metric key in results.json's "mean", header).
COLUMNS = (
    (ACCURACY, "accuracy"),
    (MACRO_F1, "macro-F1"),
    (IID_PREFIX + ACCURACY, "IID accuracy"),
    (IID_PREFIX + MACRO_F1, "IID macro-F1"),
    (ROUTED_TO_NEIGHBOUR, "routed to neighbours"),
)


# stages.pooled-probe of results.json (pipelines/probes.py): what was probed, and which scores.
PROBE_FEATURES = (
    ("raw-pixels", "raw pixels (floor)"),
    ("random-init", "random-init ResNet20 (floor)"),
    ("extractor", "stage-1 extractor"),
)
PROBE_COLUMNS = (
    ("knn-pooled-accuracy", "kNN"),
    ("linear-pooled-accuracy", "linear"),
    ("mlp-pooled-accuracy", "MLP"),
)


def run_name(name: str, seed: int, tau: float) -> str:
    """The run folder of one (seed, tau) point, e.g. ``reproduce-s0-tau0.1``."""
    return f"{name}-s{seed}-tau{tau:g}"


def finished_results(results: Path, **expected: object) -> dict | None:
    """The contents of ``results`` if it is a completed run whose config has every ``expected``
    value (kebab-case keys: ``finished_results(path, seed=0, **{"load-cap-slack": 1.5})``), else ``None``."""
    if not results.is_file():
        return None
    data = json.loads(results.read_text())
    cfg = data.get("config", {})
    same = all(key in cfg and cfg[key] == value for key, value in expected.items())
    return data if same and data.get("run", {}).get("status") == "completed" else None


def finished_with(results: Path, **expected: object) -> bool:
    """Whether ``results`` is a completed run with every ``expected`` config value
    (:func:`finished_results`), so a sweep reuses it."""
    return finished_results(results, **expected) is not None


def resumable(run_dir: Path, expected: Mapping[str, object]) -> dict | None:
    """The config to resume ``run_dir`` with, if it is an unfinished run with checkpoints whose
    recorded config has every ``expected`` value (``output-dir`` aside: the folder says where); else ``None``.

    A completed run, a folder without ``resume/*.pt`` or one of another config
    is not resumed (the caller starts that point afresh).
    """
    from ..pipelines.resume import RESUME_DIR
    from .run import resume_config

    results = run_dir / "results.json"
    if not results.is_file() or not any((run_dir / RESUME_DIR).glob("*.pt")):
        return None
    if json.loads(results.read_text()).get("run", {}).get("status") == "completed":
        return None
    config = resume_config(run_dir)  # recorded config, non-finite floats restored
    same = all(config.get(key) == value for key, value in expected.items() if key not in ("output-dir", "resume"))
    return config if same else None


def completed(results: Path, seed: int, tau: float) -> bool:
    """Whether ``results`` is a finished run of this seed and tau (so it is reused)."""
    return finished_with(results, seed=seed, tau=tau)


def finished_tau_runs(root: Path, name: str, seed: int) -> dict[float, dict]:
    """tau -> results.json of every finished run folder ``<name>-s<seed>-tau<tau>`` under ``root``,
    in increasing tau."""
    prefix = f"{name}-s{seed}-tau"
    runs = {}
    for folder in root.glob(glob_escape(prefix) + "*"):
        try:
            tau = float(folder.name[len(prefix):])
        except ValueError:
            continue  # e.g. <name>-s0-tau0.1-old: not a run folder of this naming
        if folder.name == run_name(name, seed, tau):
            data = finished_results(folder / "results.json", seed=seed, tau=tau)
            if data is not None:
                runs[tau] = data
    return dict(sorted(runs.items()))


def fmt(values: Sequence[float]) -> str:
    """``mean ± std`` over runs (sample std), the mean alone for one run, ``-`` for none."""
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:.3f}"


def summarize(runs: Sequence[Mapping]) -> dict[str, dict[str, list[float]]]:
    """Per method and metric, the list of run means (runs lacking a method or metric are left out).

    ``runs`` are the ``results`` sections of results.json files; the methods
    follow :data:`nmoe_flwr.pipelines.results.METHODS` order.
    """
    from ..pipelines.results import METHODS

    table: dict[str, dict[str, list[float]]] = {}
    for method in METHODS:
        for key, _ in COLUMNS:
            values = [float(r[method]["mean"][key]) for r in runs if key in r.get(method, {}).get("mean", {})]
            if values:
                table.setdefault(method, {})[key] = values
    return table


def summarize_probes(stages: Sequence[Mapping]) -> dict[str, dict[str, list[float]]]:
    """Per probed feature (raw pixels, random init, extractor) and probe, the list of pooled test
    accuracies over runs; ``stages`` are the ``stages`` sections of results.json files (runs
    without ``pooled-probe``, e.g. ``pooled-probe = false``, are left out)."""
    table: dict[str, dict[str, list[float]]] = {}
    for feature, _ in PROBE_FEATURES:
        for key, _ in PROBE_COLUMNS:
            values = [float(s["pooled-probe"][feature][key]) for s in stages
                      if key in s.get("pooled-probe", {}).get(feature, {})]
            if values:
                table.setdefault(feature, {})[key] = values
    return table


def probe_table(summary: Mapping[str, Mapping[str, list[float]]]) -> str:
    """Markdown: one row per probed feature, ``mean ± std`` over seeds per probe."""
    labels = dict(PROBE_FEATURES)
    lines = ["| features | " + " | ".join(h for _, h in PROBE_COLUMNS) + " | seeds |", "|---" * (len(PROBE_COLUMNS) + 2) + "|"]
    for feature, metrics in summary.items():
        n = max(len(v) for v in metrics.values())
        lines.append(f"| {labels[feature]} | " + " | ".join(fmt(metrics.get(k, [])) for k, _ in PROBE_COLUMNS) + f" | {n} |")
    return "\n".join(lines)


def seeds_table(summary: Mapping[str, Mapping[str, list[float]]]) -> str:
    """Markdown: one row per method, ``mean ± std`` over seeds per column."""
    from ..pipelines.results import METHODS

    lines = ["| method | " + " | ".join(h for _, h in COLUMNS) + " | seeds |", "|---" * (len(COLUMNS) + 2) + "|"]
    for method, metrics in summary.items():
        n = max(len(v) for v in metrics.values())
        cells = [fmt(metrics.get(key, [])) for key, _ in COLUMNS]
        lines.append(f"| {METHODS.get(method, method)} | " + " | ".join(cells) + f" | {n} |")
    return "\n".join(lines)


def tau_table(by_tau: Mapping[float, Mapping[str, Mapping[str, list[float]]]], key: str = MACRO_F1) -> str:
    """Markdown: one row per method that reports ``key`` at some tau, one column per tau (one seed per tau)."""
    from ..pipelines.results import METHODS

    taus = sorted(by_tau)
    methods = list(dict.fromkeys(m for t in taus for m, metrics in by_tau[t].items() if key in metrics))
    lines = ["| method | " + " | ".join(f"tau = {t:g}" for t in taus) + " |", "|---" * (len(taus) + 1) + "|"]
    for method in methods:
        cells = [fmt(by_tau[t].get(method, {}).get(key, [])) for t in taus]
        lines.append(f"| {METHODS.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    """Run the missing (seed, tau) points, then write the tables and plots."""
    from ..pipelines.plots import metric_vs_tau
    from .flwr_process import checked_run_config, merged_run_config
    from .run import launch

    parser = argparse.ArgumentParser(prog="nmoe-reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-config", default="configs/paper.toml", help="preset TOML (default: configs/paper.toml)")
    parser.add_argument("--set", action="append", default=[], help='extra "key=value ..." overrides for every run')
    parser.add_argument("--seeds", default="0,1,2", help="seeds at the preset's tau (default 0,1,2)")
    parser.add_argument("--taus", default="0.1,0.3,0.5", help="tau values of the sweep (default 0.1,0.3,0.5)")
    parser.add_argument("--tau-seed", type=int, default=0, help="the seed of the tau sweep (default 0)")
    parser.add_argument("--name", default="reproduce", help="prefix of the run folders and the summary folder")
    parser.add_argument("--tables-only", action="store_true", help="run nothing; tables from the finished runs")
    parser.add_argument("--app", type=Path, default=Path("."))
    parser.add_argument("--flwr-home", type=Path, help="where launches keep their state: each gets its own FLWR_HOME under <this>/launches/ (default: <app>/.flwr)")
    args = parser.parse_args(argv)

    base = checked_run_config(parser.prog, args.app, args.run_config, args.set)
    root = output_root(str(base.get("output-dir", "")))
    if (root / args.name / "results.json").exists():
        # The summary folder is <output-dir>/<name>: never write tables into a run's own folder.
        print(f"nmoe-reproduce: {root / args.name} is a run folder; choose another --name", file=sys.stderr)
        return 2
    preset_tau = float(base.get("tau", 0.1))
    seeds = [int(s) for s in _floats(args.seeds)]
    points = [(s, preset_tau) for s in seeds] + [(args.tau_seed, t) for t in _floats(args.taus)]
    points = list(dict.fromkeys(points))
    env = {"NMOE_OUTPUT_DIR": str(root)}
    for i, (seed, tau) in enumerate(points, 1):
        name = run_name(args.name, seed, tau)
        results = root / name / "results.json"
        if completed(results, seed, tau):
            print(f"[{i}/{len(points)}] {name}: finished earlier, reused", flush=True)
            continue
        if args.tables_only:
            print(f"[{i}/{len(points)}] {name}: not finished, left out", flush=True)
            continue
        point = f'seed={seed} tau={tau} run-name="{name}"'
        resume = resumable(root / name, merged_run_config(args.run_config, [*args.set, point]))
        if resume is not None:
            print(f"\n=== [{i}/{len(points)}] seed {seed}, tau {tau:g}: resuming {root / name} ===", flush=True)
            status, record = launch(args.app, resume, flwr_home=args.flwr_home, extra_env=env)
        else:
            print(f"\n=== [{i}/{len(points)}] seed {seed}, tau {tau:g} -> {root / name} ===", flush=True)
            status, record = launch(args.app, args.run_config, flwr_home=args.flwr_home, extra_env=env,
                                    overrides=[*args.set, point])
        if status != "finished:completed":
            print(f"{name}: run {status}: {record.get('status-details', '')}", file=sys.stderr)
            return 1

    def results_of(seed: int, tau: float) -> Mapping | None:
        return finished_results(root / run_name(args.name, seed, tau) / "results.json", seed=seed, tau=tau)

    runs = [r for r in (results_of(s, preset_tau) for s in seeds) if r is not None]
    by_seed = [r["results"] for r in runs]
    probes = summarize_probes([r.get("stages", {}) for r in runs])
    # Every finished run of the tau seed, not only this invocation's --taus: tau.md, the plots and
    # reproduce.json then always describe the same runs.
    by_tau = {t: summarize([r["results"]]) for t, r in finished_tau_runs(root, args.name, args.tau_seed).items()}
    if not by_seed:
        print("no finished run to summarize", file=sys.stderr)
        return 1
    folder = root / args.name
    folder.mkdir(parents=True, exist_ok=True)
    summary = summarize(by_seed)
    seeds_md = seeds_table(summary)
    if probes:
        seeds_md += ("\n\nPooled probes of the stage-1 extractor and its floors (all clients' data pooled, "
                     f"test accuracy)\n\n{probe_table(probes)}")
    (folder / "seeds.md").write_text(f"tau = {preset_tau:g}, seeds {args.seeds} (mean ± sample std over seeds)\n\n{seeds_md}\n")
    (folder / "reproduce.json").write_text(json.dumps(
        {"preset": args.run_config, "overrides": args.set, "tau": preset_tau, "seeds": summary, "probes": probes,
         "tau-seed": args.tau_seed, "by-tau": {str(t): v for t, v in by_tau.items()}}, indent=2))
    written = ["seeds.md", "reproduce.json"]
    tau_md = ""
    # No finished run of --tau-seed (e.g. --taus '' and a --seeds without it): no tau table to draw.
    if by_tau:
        tau_md = "\n\n".join(f"{label}\n\n{tau_table(by_tau, key)}" for key, label in
                             ((MACRO_F1, "macro-F1"), (IID_PREFIX + MACRO_F1, "IID macro-F1"), (ROUTED_TO_NEIGHBOUR, "routed to neighbours")))
        (folder / "tau.md").write_text(f"seed {args.tau_seed}, one run per tau\n\n{tau_md}\n")
        written.append("tau.md")
    plots = ["macro_f1_vs_tau.png", "routed_vs_tau.png"]
    if len(by_tau) > 1:
        metric_vs_tau(by_tau, MACRO_F1, "macro-F1 (same-distribution test)", folder / plots[0])
        metric_vs_tau(by_tau, ROUTED_TO_NEIGHBOUR, "share routed to a neighbour (NMoE)", folder / plots[1])
        written += plots
    # A tau.md or plot of an earlier invocation whose runs are gone would contradict reproduce.json.
    stale = [f for f in ("tau.md", *plots) if f not in written and (folder / f).exists()]
    for f in stale:
        (folder / f).unlink()
    removed = f"; removed {', '.join(stale)} (no finished runs behind them)" if stale else ""
    print(f"\n{seeds_md}\n\n{tau_md}\n\nWrote {', '.join(written)} in {folder}{removed}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
