"""Wall time and peak memory of a whole NMoE run at 10 / 100 / 1000 virtual clients (issue 13).

Runs ``configs/many-clients.toml`` through ``nmoe-run`` (Flower's simulation
engine, Ray, one CPU per virtual client) once per client count, with 10
clients sampled per federated round (``fraction-train = 10 / N``) and 11 gate
candidates per client (the whole bank at N = 10). While a run lasts, every
0.5 s it sums the proportional set size (PSS: shared pages split between
the processes that map them, so Ray workers that share torch are not counted
twice) of every process the run started (found by an environment marker
they all inherit), and keeps the peak. Also reads the per-stage timings of
``results.json`` and the run folder's size on disk (clients' cached splits,
latents, banks, checkpoints).

    python benchmarks/scale_clients.py                       # 10, 100, 1000 clients
    python benchmarks/scale_clients.py --clients 10 100 --out outputs/scale-small

Prints a Markdown table and writes ``<out>/scale.json`` and
``<out>/scale.png`` (log-log: time and memory against clients). Linux only
(``/proc``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nmoe_flwr.cli.run import launch

MARKER = "NMOE_SCALE_RUN"
PER_ROUND = 10  # clients sampled per federated round
CANDIDATES = 11  # gate candidates per client


def _pss_kib(pid: str) -> int:
    """PSS of one process in KiB (0 if it is gone or unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _marked(entry: bytes) -> list[str]:
    """Pids of live processes whose environment holds ``entry``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if entry in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(proc.name)
            except OSError:
                continue
    return pids


class PeakMemory(threading.Thread):
    """Samples the summed PSS of the marked processes until :meth:`stop`; ``peak_mib``, ``peak_processes``."""

    def __init__(self, entry: bytes, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.entry, self.every = entry, every
        self.peak_mib, self.peak_processes = 0.0, 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            pids = _marked(self.entry)
            total = sum(_pss_kib(p) for p in pids) / 1024
            if total > self.peak_mib:
                self.peak_mib, self.peak_processes = total, len(pids)
            self._done.wait(self.every)

    def stop(self) -> None:
        self._done.set()
        self.join()


def _folder_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def run_one(n: int, preset: str, out: Path, extra: list[str]) -> dict:
    """One run at ``n`` clients; returns its measurements."""
    tag = uuid.uuid4().hex
    ray_tmp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # Ray's socket paths must stay short
    flwr_home = Path(tempfile.mkdtemp(prefix="nmoe-scale-flwr-"))
    name = f"scale-{n}"
    overrides = [(f'num-clients={n} fraction-train={min(1.0, PER_ROUND / n)} gate-candidates={CANDIDATES if n > CANDIDATES else 0} '
                 f'run-name="{name}"'), *extra]
    memory = PeakMemory(f"{MARKER}={tag}".encode())
    memory.start()
    t0 = time.perf_counter()
    try:
        status, _ = launch(ROOT, preset, overrides=overrides, flwr_home=flwr_home, log_file=out / f"{name}.log",
                           extra_env={"NMOE_OUTPUT_DIR": str(out), "RAY_TMPDIR": str(ray_tmp), MARKER: tag})
    finally:
        wall = time.perf_counter() - t0
        memory.stop()
        shutil.rmtree(flwr_home, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    results = json.loads((out / name / "results.json").read_text())
    nmoe = results["results"].get("nmoe", {}).get("mean", {})
    return {
        "clients": n, "status": status, "wall-s": round(wall, 1), "peak-pss-mib": round(memory.peak_mib, 1),
        "processes-at-peak": memory.peak_processes, "disk-mib": round(_folder_mib(out / name), 1),
        "results-json-mib": round((out / name / "results.json").stat().st_size / 2**20, 2),
        "timings-s": results["timings-s"], "nmoe-accuracy": nmoe.get("accuracy"), "nmoe-macro-f1": nmoe.get("macro-f1"),
        "expert-macro-f1": results["results"].get("personalized-expert", {}).get("mean", {}).get("macro-f1"),
    }


def table(rows: list[dict]) -> str:
    """The Markdown table of the README."""
    stages = ("discover-nodes", "stage1-fedce", "stage2-experts", "stage3-send-bank", "stage3-gate", "eval-nmoe")
    head = ["clients", "wall s", "s / client", "peak PSS MiB", "MiB / client", "disk MiB", "results.json MiB", *stages,
            "NMoE F1", "expert F1"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        t = r["timings-s"]
        cells = [r["clients"], r["wall-s"], f"{r['wall-s'] / r['clients']:.2f}", r["peak-pss-mib"],
                 f"{r['peak-pss-mib'] / r['clients']:.1f}", r["disk-mib"], r["results-json-mib"], *(f"{t.get(s, float('nan')):.1f}" for s in stages),
                 f"{r['nmoe-macro-f1']:.3f}" if r["nmoe-macro-f1"] is not None else "-",
                 f"{r['expert-macro-f1']:.3f}" if r["expert-macro-f1"] is not None else "-"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Log-log: wall time and peak PSS against clients, with the linear reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["clients"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in ((axes[0], "wall-s", "wall time (s)"), (axes[1], "peak-pss-mib", "peak memory, PSS (MiB)")):
        y = [r[key] for r in rows]
        ax.loglog(n, y, "o-", label="measured")
        ax.loglog(n, [y[0] * k / n[0] for k in n], "--", color="grey", label="linear in clients")
        ax.set_xlabel("virtual clients")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("configs/many-clients.toml, 2 CPU cores, 10 clients per round")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--preset", default=str(ROOT / "configs" / "many-clients.toml"))
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "scale")
    parser.add_argument("--set", action="append", default=[], metavar='"KEY=VALUE ..."', help="extra overrides")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.clients:
        print(f"--- {n} clients ---", flush=True)
        rows.append(run_one(n, args.preset, args.out, args.set))
        print(json.dumps(rows[-1]), flush=True)
        (args.out / "scale.json").write_text(json.dumps(rows, indent=2))
    print(table(rows))
    if len(rows) > 1:
        plot(rows, args.out / "scale.png")
        print(f"plot: {args.out / 'scale.png'}")
    return 0 if all(r["status"] == "finished:completed" for r in rows) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
