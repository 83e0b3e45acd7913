"""Where a run writes: results on the server, caches on each client.

Layout under ``<output-dir>/<run-name>/``::

    results.json, rounds.csv        written by the ServerApp
    clients/<partition-id>/         each client's local disk: its data split,
                                    cached latents, the frozen expert bank
``<output-dir>/.cache/`` holds decoded data sets shared by runs.
"""

from __future__ import annotations

import os
from pathlib import Path

OUTPUT_DIR_ENV = "NMOE_OUTPUT_DIR"


def output_root(configured: str) -> Path:
    """``output-dir`` from the run config, else ``$NMOE_OUTPUT_DIR``, else ``./outputs``.

    The result is absolute: in simulation the ServerApp and the ClientApps
    may run with different working directories.
    """
    return Path(configured or os.environ.get(OUTPUT_DIR_ENV) or "outputs").expanduser().resolve()


def run_name(configured: str, run_id: int) -> str:
    """``run-name`` from the config, else ``run-<flower run id>``."""
    return configured or f"run-{run_id}"


def run_dir(configured_output: str, configured_name: str, run_id: int) -> Path:
    """``<output-dir>/<run-name>`` (not created)."""
    return output_root(configured_output) / run_name(configured_name, run_id)


def client_dir(run: Path, partition_id: int) -> Path:
    """A client's local working folder, created on first use."""
    path = run / "clients" / str(partition_id)
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir(configured_output: str) -> Path:
    """Folder for decoded data sets, shared by all runs under one output root."""
    return output_root(configured_output) / ".cache"
