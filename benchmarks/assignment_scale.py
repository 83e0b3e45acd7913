"""Time and memory of one round's client–expert assignment at 10 / 100 / 1000 sampled clients.

The alignment pipeline solves one assignment per round over the clients
sampled for it (``algorithms.alignment.assign``); ``optimal`` is a MILP
(HiGHS) with ``clients x experts`` binaries, the other rules are a sort.
Random scores and capacities 1-4 (seeded); peak memory of the Python heap
(``tracemalloc``, which sees numpy and scipy.sparse buffers but not HiGHS's
own C++ allocations).

    python benchmarks/assignment_scale.py
    python benchmarks/assignment_scale.py --clients 10 100 1000 --experts 16
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nmoe_flwr.algorithms.alignment import RULES, AlignmentScores, assign


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--experts", type=int, default=16)
    args = parser.parse_args(argv)
    assign("optimal", [0, 1], {0: 1, 1: 1}, AlignmentScores(2, 2), np.random.default_rng(0))  # import scipy once
    print("| clients | " + " | ".join(f"{r} s" for r in RULES) + " | optimal peak MiB |")
    print("|---|" + "---|" * (len(RULES) + 1))
    for n in args.clients:
        rng = np.random.default_rng(n)
        scores = AlignmentScores(n, args.experts)
        scores.fitness[:] = rng.random((n, args.experts))
        capacities = {i: int(c) for i, c in enumerate(rng.integers(1, 5, n))}
        times = []
        for rule in RULES:
            tracemalloc.start()
            t = time.perf_counter()
            chosen = assign(rule, list(range(n)), capacities, scores, np.random.default_rng(0))
            times.append(time.perf_counter() - t)
            peak = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
            assert all(len(chosen[i]) == min(capacities[i], args.experts) for i in range(n))
        print(f"| {n} | " + " | ".join(f"{t:.3f}" for t in times) + f" | {peak:.1f} |")
    # HiGHS allocates outside Python's heap: the process's peak RSS bounds it from above.
    print(f"process peak RSS (Python + torch + scipy + HiGHS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
