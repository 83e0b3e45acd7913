"""What a run writes on the server: results.json, rounds.csv and the closing table.

``results.json`` sections: ``run`` (id, name, status, notes), ``config`` (the
resolved run config), ``timings-s`` (wall time of every timed step of the
server), ``stages`` (what each training stage -- and the alignment phase --
reported, per round and per client) and ``results`` (every method's
per-client metrics and their mean). ``rounds.csv`` has one row per
aggregated round of every federated phase (column ``stage``).
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from logging import INFO
from pathlib import Path
from typing import Any, TypeVar

from flwr.supercore import log

from ..constants import ACCURACY, IID_PREFIX, MACRO_F1, ROUTED_TO_NEIGHBOUR

T = TypeVar("T")

# Rows of the closing table: results key -> label.
METHODS = {
    "nmoe": "NMoE (top-k over all experts)",
    "personalized-expert": "personalized expert alone",
    "fedce-classifier": "FedCE end-to-end classifier",
    "local-classifier": "local classifier",
    "centralized-moe": "centralized MoE (upper bound)",
    "router-ceiling": "router ceiling (pooled MLP)",
    "oracle-class-owner": "oracle routing: class owner",
    "oracle-best-expert": "oracle routing: best expert",
    "extractor-knn": "extractor kNN probe (stage 1)",
    "alignment-global-moe": "global MoE (expert assignment)",
}


def _number(text: str) -> Any:
    """A rounds.csv cell back as int or float where it is one."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def jsonable(value: Any) -> Any:
    """Replace non-finite floats by the strings "inf", "-inf", "nan" (strict JSON has none)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


class RunRecorder:
    """Collects a run's metrics and writes them after every stage.

    ``results.json`` is rewritten atomically (temp file + rename) each time
    :meth:`save` is called, so a crash mid-run leaves the stages that
    finished, never a truncated file.

    Parameters
    ----------
    folder : Path
        ``<output-dir>/<run-name>``; created if missing.
    config : mapping
        The resolved run config (written as is).
    """

    def __init__(self, folder: Path, config: Mapping[str, Any], run_id: int, resume: bool = False) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = {
            "run": {"run-id": run_id, "name": folder.name, "status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S")},
            "config": dict(config),
            "timings-s": {},
            "stages": {},
            "results": {},
        }
        self.rounds: list[dict[str, Any]] = []
        earlier = folder / "results.json"
        if resume and earlier.exists():  # keep what the killed attempt recorded
            old = json.loads(earlier.read_text())
            for section in ("timings-s", "stages", "results"):
                self.data[section] = old.get(section, {})
            self.data["run"]["resumed-runs"] = [*old["run"].get("resumed-runs", []), old["run"].get("run-id")]
            if (folder / "rounds.csv").exists():
                with (folder / "rounds.csv").open(newline="") as fh:
                    self.rounds = [{k: _number(v) for k, v in row.items() if v != ""} for row in csv.DictReader(fh)]
        else:
            # A run reusing a run name must not leave the earlier run's files claiming "completed".
            (folder / "rounds.csv").unlink(missing_ok=True)
        self.save()

    def has(self, section: str, key: str) -> bool:
        """Whether ``results.json`` already holds ``section[key]`` (e.g. a result a resumed run keeps)."""
        return key in self.data[section]

    @classmethod
    def config_failure(cls, folder: Path, raw_config: Mapping[str, Any], run_id: int, error: Exception) -> Path:
        """Write a ``failed`` results.json for a run whose config was refused (replacing an older run's)."""
        rec = cls(folder, jsonable(dict(raw_config)), run_id)
        rec.note("error", f"{type(error).__name__}: {error}")
        return rec.save("failed")

    def timing(self, name: str, seconds: float) -> None:
        """Record the wall time of a step of the server's work."""
        self.data["timings-s"][name] = round(seconds, 3)

    def timed(self, name: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` as the step ``name``: log its start and end, record its wall time."""
        t0 = time.perf_counter()
        log(INFO, "=== %s ===", name)
        out = fn()
        self.timing(name, time.perf_counter() - t0)
        log(INFO, "=== %s done in %.1f s ===", name, time.perf_counter() - t0)
        return out

    def stage_details(self, name: str, info: Mapping[str, Any]) -> None:
        """Record what a training stage (or the alignment phase) reported:
        per-round and per-client metrics, settings, privacy spent."""
        self.data["stages"][name] = dict(info)

    def add_rounds(self, stage: str, rounds: Mapping[int, Mapping[str, float]]) -> None:
        """Set the per-round aggregated metrics of a federated phase in rounds.csv (replacing that phase's rows)."""
        self.rounds = [row for row in self.rounds if row.get("stage") != stage]
        for rnd, metrics in sorted(rounds.items()):
            self.rounds.append({"stage": stage, "round": rnd, **metrics})

    def result(
        self,
        method: str,
        per_client: Mapping[int, Mapping[str, float]],
        mean: Mapping[str, float],
        missing: Mapping[int, str] | None = None,
    ) -> None:
        """Record one method's per-client metrics and their mean over clients
        (over the clients that answered; ``missing``: ``{partition id: reason}`` of the others)."""
        self.data["results"][method] = {
            "mean": dict(mean),
            "per-client": {str(k): dict(v) for k, v in sorted(per_client.items())},
        }
        if missing:
            self.data["results"][method]["missing"] = {str(k): v for k, v in sorted(missing.items())}

    def note(self, key: str, value: Any) -> None:
        """Record a free-form fact about the run (e.g. why a baseline was skipped)."""
        self.data["run"][key] = value

    def save(self, status: str | None = None) -> Path:
        """Write results.json and rounds.csv; return the path of results.json."""
        if status is not None:
            self.data["run"]["status"] = status
            self.data["run"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        path = self.folder / "results.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(jsonable(self.data), indent=2, allow_nan=False))
        os.replace(tmp, path)
        if self.rounds:
            keys = list(dict.fromkeys(k for row in self.rounds for k in row))
            tmp = self.folder / "rounds.csv.tmp"
            with tmp.open("w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=keys)
                writer.writeheader()
                writer.writerows(self.rounds)
            os.replace(tmp, self.folder / "rounds.csv")
        return path

    def table(self) -> str:
        """The closing results table (mean over clients; ``iid`` columns: the IID test setting)."""
        head = f"{'method':<36} {'accuracy':>9} {'macro-F1':>9} {'iid acc':>8} {'iid F1':>8} {'routed':>7}"
        lines = [head, "-" * len(head)]
        for key, label in METHODS.items():
            mean = self.data["results"].get(key, {}).get("mean")
            if not mean:
                continue
            cells = [mean.get(k, math.nan) for k in (IID_PREFIX + ACCURACY, IID_PREFIX + MACRO_F1, ROUTED_TO_NEIGHBOUR)]
            iid_acc, iid_f1, routed = ("" if math.isnan(v) else f"{v:.4f}" if i < 2 else f"{v:.3f}" for i, v in enumerate(cells))
            lines.append(f"{label:<36} {mean[ACCURACY]:9.4f} {mean[MACRO_F1]:9.4f} {iid_acc:>8} {iid_f1:>8} {routed:>7}")
        return "\n".join(lines)
