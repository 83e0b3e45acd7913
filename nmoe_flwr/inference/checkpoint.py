"""Per-client checkpoints: what a device needs for serverless inference.

Layout (one folder per client, written by the client at the end of training)::

    <output-dir>/<run-name>/checkpoints/client-<id>/
        manifest.json     partition id, sizes, pixel statistics, file names (and the run)
        extractor.pt      ResNet20 state dict   } torch.save of plain tensors:
        gate.pt           gate state dict       } torch.load(..., weights_only=True)
        expert.pt         this client's expert  }
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..algorithms.models import MLP, Gate, ResNet20
from ..data.registry import PixelStats, dataset_spec

FORMAT = 1
FILES = {"extractor": "extractor.pt", "gate": "gate.pt", "expert": "expert.pt"}


def client_checkpoint_dir(run: Path, partition_id: int) -> Path:
    """``<run>/checkpoints/client-<id>``."""
    return run / "checkpoints" / f"client-{partition_id}"


def write_checkpoint(folder: Path, states: dict[str, dict[str, torch.Tensor]], manifest: dict[str, Any]) -> Path:
    """Write the three state dicts and the manifest (manifest last: its presence means complete)."""
    folder.mkdir(parents=True, exist_ok=True)
    for part, name in FILES.items():
        torch.save({k: v.detach().cpu() for k, v in states[part].items()}, folder / name)
    (folder / "manifest.json").write_text(json.dumps({"format": FORMAT, "files": FILES, **manifest}, indent=2))
    return folder


@dataclass
class ClientCheckpoint:
    """A loaded client checkpoint, models in eval mode on the CPU."""

    partition_id: int
    manifest: dict[str, Any]
    extractor: ResNet20
    gate: Gate
    expert: MLP


def checkpoint_pixel_stats(manifest: dict[str, Any]) -> PixelStats:
    """The pixel statistics the checkpoint's extractor was trained with.

    Manifests carry them as ``pixel-mean``/``pixel-std``; older ones only
    name the ``dataset``, whose registry entry then supplies them.
    """
    if "pixel-mean" in manifest:
        return PixelStats(tuple(manifest["pixel-mean"]), tuple(manifest["pixel-std"]))
    if "dataset" in manifest:
        return dataset_spec(str(manifest["dataset"])).pixel_stats
    raise ValueError("checkpoint manifest has neither pixel-mean/pixel-std nor dataset: cannot normalise inputs")


def load_checkpoint(folder: Path) -> ClientCheckpoint:
    """Load a folder written by :func:`write_checkpoint`.

    Raises
    ------
    FileNotFoundError
        No manifest (naming the folder and how checkpoints are made).
    """
    path = folder / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: checkpoints are written by a finished NMoE run "
            "(flwr run / nmoe-run) under <output-dir>/<run-name>/checkpoints/client-<id>"
        )
    m = json.loads(path.read_text())
    if m.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format {m.get('format')!r}, this version reads {FORMAT}")
    load = lambda part: torch.load(folder / m["files"][part], weights_only=True)
    extractor_state = load("extractor")
    extractor = ResNet20(checkpoint_pixel_stats(m), ResNet20.norm_of(extractor_state))
    extractor.load_state_dict(extractor_state)
    gate = Gate(int(m["latent-dim"]), int(m["mlp-hidden"]), int(m["num-experts"]))
    gate_state = load("gate")
    gate_state.setdefault("log_prior", torch.zeros(int(m["num-experts"])))  # written before gates had a prior: none
    gate.load_state_dict(gate_state)
    expert = MLP(int(m["latent-dim"]), int(m["mlp-hidden"]), int(m["num-classes"]))
    expert.load_state_dict(load("expert"))
    return ClientCheckpoint(int(m["partition-id"]), m, extractor.eval(), gate.eval(), expert.eval())
