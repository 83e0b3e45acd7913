"""Flower's deployment engine on loopback: TLS, SuperNode authentication, three SuperNodes.

Slow (a few minutes): every message starts a fresh ClientApp process and idle
SuperNodes poll every few seconds. Run by CI.
"""

import json
from pathlib import Path

import pytest
from conftest import processes_mentioning

from nmoe_flwr.cli.deploy_loopback import deploy

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


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
    assert processes_mentioning(str(tmp_path)) == []


def test_node_without_partition_id_fails_fast_naming_the_key(tmp_path):
    configs = ["partition-id=0 num-partitions=3", "partition-id=1 num-partitions=3", "num-partitions=3"]
    outcome = deploy(ROOT, str(ROOT / "configs" / "deploy-smoke.toml"), 3, tmp_path, node_configs=configs, timeout=300)
    assert outcome["status"] == "finished:failed"
    assert "node_config lacks partition-id;" in outcome["details"]
    assert outcome["wall-seconds"] < 120
    assert processes_mentioning(str(tmp_path)) == []


def test_sigterm_of_the_launcher_stops_every_process_it_started(tmp_path):
    """Issue 12: `kill -TERM` of nmoe-deploy-loopback left 13 processes running."""
    import os
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "nmoe_flwr.cli.deploy_loopback", "--app", str(ROOT), "--workdir", str(tmp_path),
           "--run-config", str(ROOT / "configs" / "deploy-smoke.toml"), "--timeout", "300"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        # Wait until the SuperLink and the SuperNodes are up (they mention the workdir).
        while len(processes_mentioning(str(tmp_path))) < 5 and time.monotonic() < deadline:
            time.sleep(1)
        assert len(processes_mentioning(str(tmp_path))) >= 5, "the deployment did not start"
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=120) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
    assert processes_mentioning(str(tmp_path)) == []
