"""PNG plots of the alignment runs (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def assignment_heatmap(counts: np.ndarray, path: Path, title: str) -> Path:
    """Client x expert heatmap of how many rounds each client trained each expert."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 0.35 * counts.shape[1], 1.0 + 0.35 * counts.shape[0]))
    im = ax.imshow(counts, cmap="viridis", aspect="auto")
    ax.set_xlabel("expert")
    ax.set_ylabel("client (partition id)")
    ax.set_xticks(range(counts.shape[1]))
    ax.set_yticks(range(counts.shape[0]))
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="rounds trained")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def accuracy_curves(curves: Mapping[str, Mapping[int, float]], path: Path, target: float | None = None) -> Path:
    """Global accuracy per round, one line per run (e.g. per assignment rule)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        rounds = sorted(curve)
        ax.plot(rounds, [curve[r] for r in rounds], label=name)
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.2f}")
    ax.set_xlabel("round")
    ax.set_ylabel("global accuracy (held-out)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def metric_vs_tau(
    by_tau: Mapping[float, Mapping[str, Mapping[str, list[float]]]], metric: str, ylabel: str, path: Path
) -> Path:
    """One line per method: ``metric`` (mean over the runs of each tau) against the skew tau.

    ``by_tau[tau][method][metric]`` lists run means (``nmoe-reproduce``'s summaries).
    """
    from .results import METHODS

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    taus = sorted(by_tau)
    methods = list(dict.fromkeys(m for t in taus for m in by_tau[t] if metric in by_tau[t][m]))
    for method in methods:
        points = [(t, float(np.mean(by_tau[t][method][metric]))) for t in taus if metric in by_tau[t].get(method, {})]
        ax.plot([t for t, _ in points], [v for _, v in points], marker="o", label=METHODS.get(method, method))
    ax.set_xlabel("tau (share of a client's data outside its dominant class)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
