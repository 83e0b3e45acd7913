"""Flower's deployment engine on loopback: TLS, SuperNode authentication, three SuperNodes.

Slow (a few minutes): every message starts a fresh ClientApp process and idle
SuperNodes poll every few seconds. Run by CI.
"""

import json
import os
from pathlib import Path

import pytest

from nmoe_flwr.deploy_loopback import deploy

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _left_behind(flwr_home: Path) -> list[str]:
    """Live processes started for this deployment (they inherit its FLWR_HOME)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                env = (proc / "environ").read_bytes().decode(errors="replace")
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z" and f"FLWR_HOME={flwr_home}\0" in env + "\0":
                found.append(proc.name)
    return found


def test_smoke_on_three_supernodes_with_tls_completes(tmp_path):
    outcome = deploy(ROOT, str(ROOT / "configs" / "deploy-smoke.toml"), 3, tmp_path, timeout=1200)
    assert outcome["status"] == "finished:completed", outcome
    results = json.loads(Path(outcome["results"]).read_text())
    assert results["run"]["status"] == "completed"
    for method in ("nmoe", "fedce-classifier", "extractor-knn", "personalized-expert"):
        assert set(results["results"][method]["per-client"]) == {"0", "1", "2"}, method
    assert results["results"]["nmoe"]["mean"]["accuracy"] > 0.5
    for i in range(3):  # each node wrote to its own output-dir from --node-config
        assert (tmp_path / f"node-{i}" / "deploy-smoke" / "checkpoints" / f"client-{i}" / "manifest.json").exists()
    assert "BEGIN CERTIFICATE" in (tmp_path / "certs" / "ca.pem").read_text()
    assert _left_behind(tmp_path / "flwr-home") == []


def test_node_without_partition_id_fails_fast_naming_the_key(tmp_path):
    configs = ["partition-id=0 num-partitions=3", "partition-id=1 num-partitions=3", "num-partitions=3"]
    outcome = deploy(ROOT, str(ROOT / "configs" / "deploy-smoke.toml"), 3, tmp_path, node_configs=configs, timeout=300)
    assert outcome["status"] == "finished:failed"
    assert "node_config lacks partition-id;" in outcome["details"]
    assert outcome["wall-seconds"] < 120
    assert _left_behind(tmp_path / "flwr-home") == []
