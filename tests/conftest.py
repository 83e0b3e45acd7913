"""Shared fixtures."""

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Unit tests train tiny models: one intra-op thread each. Two threads on a
    busy 2-core machine made such steps up to ~70x slower (82 s instead of
    1.2 s measured for one test), which is what makes a suite flaky under load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def write_learnable_fmnist(folder: Path, n_train: int = 400, n_test: int = 200, seed: int = 0) -> Path:
    """A Fashion-MNIST-shaped IDX folder (train and t10k, gzipped) whose images
    depend on the label, so that a few steps learn something."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n, dtype=np.uint8) % 10
        images = (rng.integers(0, 60, (n, 28, 28)) + labels[:, None, None] * 19).astype(np.uint8)
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as fh:
            fh.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as fh:
            fh.write(struct.pack(">II", 2049, n) + labels.tobytes())
    return folder


def reply_from(node_id: int, content, message_type: str = "train"):
    """A Message as node ``node_id`` would send it (Flower stamps the sender from the task identity)."""
    from flwr.app import Message

    saved = TaskIdentity._node_id
    TaskIdentity._node_id = node_id
    try:
        return Message(content, dst_node_id=0, message_type=message_type)
    finally:
        TaskIdentity._node_id = saved


@pytest.fixture
def tiny_run_config(tmp_path):
    """Run config of a 2-client FedCE on a small learnable Fashion-MNIST written by the test (in-process grid tests).

    Restores torch's thread count afterwards: the ClientApp sets it for the whole process.
    """
    data = write_learnable_fmnist(tmp_path / "fmnist")
    threads = torch.get_num_threads()
    yield {
        "data-dir": str(data), "output-dir": str(tmp_path / "out"), "run-name": "tiny",
        "num-clients": 2, "train-per-client": 24, "test-per-client": 20, "fedce-rounds": 2,
        "batch-size": 8, "mlp-hidden": 16, "augment": True, "channels-last": False, "torch-threads": 1,
        "device": "cpu",
    }
    torch.set_num_threads(threads)
