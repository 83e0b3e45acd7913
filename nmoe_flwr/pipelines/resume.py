"""What a killed run needs to continue: per-round checkpoints of the federated stages.

Every aggregated round of FedCE and of the gate writes ``<run>/resume/<stage>.pt``
(the round, the global arrays, the per-round metrics and who was missing),
atomically (temp file + rename), so a crash leaves the last complete round,
never a torn file. Stage 2 writes ``<run>/resume/bank.pt`` once the expert
bank is in. ``nmoe-run --resume <run-dir>`` relaunches the run's own config
with ``resume = true``; the server then

- takes a finished stage 1 from ``extractor.pt`` / ``head.pt`` (like
  ``extractor-checkpoint``), an unfinished FedCE from its last round (FedSC
  restarts: its stale-matrix state is not checkpointed);
- takes the expert bank from ``bank.pt`` (the clients still have their cached
  latents on disk);
- continues the gate from its last round;
- skips evaluations and baselines whose results are already recorded, and
  reruns the NMoE evaluation (it writes the inference checkpoints).

Rounds continue with their original numbers (config key ``round-offset``), so
learning-rate schedules and per-round seeds are those of an uninterrupted run.
The layers a client keeps local (a FedCE head with ``fedce-average-head =
false``, FedGate's decision layer, every gate's log-prior offset) come back
from the client's disk, where the killed run left them after its last round
(:meth:`~nmoe_flwr.client_state.ClientStore.local` with ``resumed``); a
client whose disk is gone starts them from their initialisation, and one
that replied in the round the server did not get to checkpoint has them one
round ahead (harmless for the default gate, whose only local entry, the prior
offset, is recomputed every round).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESUME_DIR = "resume"
BANK_STAGE = "bank"


class StageCheckpoint:
    """The last completed round of one federated stage, on the server's disk.

    Parameters
    ----------
    run_folder : Path
        ``<output-dir>/<run-name>``.
    stage : str
        File name stem, e.g. ``"fedce"``, ``"gate"``, ``"bank"``.
    """

    def __init__(self, run_folder: Path, stage: str) -> None:
        self.path = run_folder / RESUME_DIR / f"{stage}.pt"

    def save(self, **state: Any) -> None:
        """Write ``state`` (tensors, dicts, lists, numbers, strings) atomically.

        Raises
        ------
        TypeError
            If :meth:`load` could not read ``state`` back (e.g. it holds numpy
            arrays, which the weights-only loader refuses); the previous
            checkpoint is then left as it was.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".pt.tmp")
        torch.save(state, tmp)
        # Read it back before it replaces the last good round: a checkpoint
        # that only fails when a killed run resumes is found far too late.
        try:
            torch.load(tmp, weights_only=True)
        except pickle.UnpicklingError as err:
            tmp.unlink()
            raise TypeError(
                f"checkpoint {self.path.name}: state with keys {sorted(state)} is not loadable with "
                f"weights_only=True (store tensors, not numpy arrays or objects): {err}"
            ) from err
        os.replace(tmp, self.path)

    def load(self) -> dict[str, Any] | None:
        """The saved state, or ``None`` if there is none."""
        if not self.path.exists():
            return None
        return torch.load(self.path, weights_only=True)


def save_bank(checkpoint: StageCheckpoint, bank: dict[int, dict], support: dict[int, np.ndarray]) -> None:
    """Write stage 2's expert bank and per-client class support.

    The support vectors are stored as tensors: the weights-only loader of
    :meth:`StageCheckpoint.load` refuses numpy arrays.
    """
    checkpoint.save(bank=bank, support={pid: torch.from_numpy(np.asarray(s)) for pid, s in support.items()})


def load_bank(checkpoint: StageCheckpoint) -> tuple[dict[int, dict], dict[int, np.ndarray]] | None:
    """``(bank, support)`` as :func:`save_bank` got them, or ``None`` if none was saved."""
    saved = checkpoint.load()
    if saved is None:
        return None
    return dict(saved["bank"]), {pid: s.numpy() for pid, s in (saved.get("support") or {}).items()}
