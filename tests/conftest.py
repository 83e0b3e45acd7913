"""Shared fixtures."""

import os
from pathlib import Path

import pytest
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture
def task_identity(monkeypatch):
    """Flower 1.41 stamps new Messages with the identity of the running task;
    outside a ServerApp/ClientApp process, give it one."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def processes_mentioning(text: str) -> list[str]:
    """Live processes whose command line or environment mention ``text``
    (every process a run starts inherits FLWR_HOME and RAY_TMPDIR below tmp)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                env = (proc / "environ").read_bytes().decode(errors="replace")
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z" and (text in cmd or text in env):
                found.append(f"{proc.name}: {cmd[:120]}")
    return found
