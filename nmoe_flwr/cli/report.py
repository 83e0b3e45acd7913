"""``python -m nmoe_flwr.report results.json [...]``: markdown tables from runs' results.json.

One row per method per run (mean over clients), so README tables are
generated from the files the runs wrote, not copied by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..constants import (
    ACCURACY,
    BYTES_PER_SAMPLE,
    IID_PREFIX,
    MACRO_F1,
    ROUTED_TO_NEIGHBOUR,
)
from ..pipelines.results import METHODS


def rows(path: Path) -> list[str]:
    """Markdown rows of one results.json."""
    data = json.loads(path.read_text())
    run = data["run"]["name"]
    out = []
    for key, label in METHODS.items():
        mean = data["results"].get(key, {}).get("mean")
        if not mean:
            continue
        routed = mean.get(ROUTED_TO_NEIGHBOUR)
        extra = f"{routed:.3f}" if routed is not None else ""
        per = mean.get(BYTES_PER_SAMPLE)
        extra += f" ({per:.0f} B/sample)" if per is not None else ""
        iid = " | ".join(f"{mean[k]:.4f}" if k in mean else "-" for k in (IID_PREFIX + ACCURACY, IID_PREFIX + MACRO_F1))
        out.append(f"| {run} | {label} | {mean[ACCURACY]:.4f} | {mean[MACRO_F1]:.4f} | {iid} | {extra} |")
    return out


def main(argv: list[str] | None = None) -> int:
    """Print one table for all given results.json files."""
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])]
    if not paths:
        print(__doc__)
        return 2
    print("| run | method | accuracy | macro-F1 | IID-test accuracy | IID-test macro-F1 | routed to neighbours |")
    print("|---|---|---|---|---|---|---|")
    for path in paths:
        print("\n".join(rows(path)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
