"""Processes of Flower's CLI and engines, shared by every ``nmoe-*`` command.

Offline environment, free loopback ports, a simulation SuperLink, streaming
``flwr run`` with a deadline, reading a run's final status (``flwr run
--stream`` exits 0 even when the run failed), and stopping a whole process
tree (Flower's SuperLink starts ``flower-superexec`` in its own session and
Ray under it, so signalling a process group is not enough).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import tomllib

RUN_ID = re.compile(r"Successfully started run (\d+)")


def offline_env(flwr_home: Path) -> dict[str, str]:
    """Environment for running Flower offline with state under ``flwr_home``."""
    env = dict(os.environ)
    env.setdefault("FLWR_HOME", str(flwr_home))
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    # Ray puts unix sockets here; a short private path avoids the 107-byte limit.
    env.setdefault("RAY_TMPDIR", f"/tmp/nmoe-ray-{os.getuid()}")
    Path(env["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of ``pid`` (read from /proc).

    Needed because Flower's SuperLink starts ``flower-superexec`` in a new
    session and Ray's processes run under it: signalling the SuperLink's
    process group would leave them running.
    """
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop_tree(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM ``proc`` and all its descendants, SIGKILL what is left after ``grace`` s."""
    pids = [proc.pid, *descendants(proc.pid)]  # collected first: orphans get re-parented
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    for pid in pids + descendants(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_healthy(
    url: str,
    timeout: float = 60.0,
    *,
    context=None,
    proc: subprocess.Popen | None = None,
    log: Path | None = None,
) -> None:
    """Poll a SuperLink's ``/health`` until it answers (``context``: TLS).

    Raises if ``proc`` (the SuperLink) exits first, naming its ``log``, or
    after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=1.0, context=context):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not healthy after {timeout:.0f} s") from None
            time.sleep(0.2)


def stream_flwr_run(
    cmd: list[str], env: dict[str, str], cwd: Path, log_file: Path | None, timeout: float
) -> tuple[str | None, int]:
    """Run ``flwr run ... --stream``, echo its output (and to ``log_file``),
    and return ``(run id or None, exit code)``; killed after ``timeout`` s."""
    print("+ " + shlex.join(cmd), flush=True)
    run_id = None
    log = log_file.open("w", buffering=1) if log_file else None  # line-buffered: tail -f works
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
        deadline = time.monotonic() + timeout
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            if log:
                log.write(line)
            if run_id is None and (m := RUN_ID.search(line)):
                run_id = m.group(1)
            if time.monotonic() > deadline:
                proc.kill()
                break
        return run_id, proc.wait()
    finally:
        if log:
            log.close()


def write_run_config(merged: dict, path: Path) -> Path:
    """The merged run config as the single TOML file ``flwr run`` accepts."""
    import tomli_w

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(merged))
    return path


@contextlib.contextmanager
def local_superlink(env: dict[str, str], workdir: Path, timeout: float = 60.0) -> Iterator[dict[str, str]]:
    """Start a simulation SuperLink on free ports; yield the env that points
    ``flwr``'s ``:local:`` connection at it; stop it and its children after."""
    http_port, control_port = free_port(), free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [
        "flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
        "--control-api-address", f"127.0.0.1:{control_port}",
        "--host", "127.0.0.1", "--port", str(http_port),
        "--database", str(workdir / "state.db"),
        "--log-file", str(workdir / "superlink.log"),
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_healthy(f"http://127.0.0.1:{http_port}/health", timeout, proc=proc, log=workdir / "superlink.log")
        yield {
            **env,
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
            "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        }
    finally:
        stop_tree(proc)


def merged_run_config(run_config: str | None, overrides: list[str] | None = None) -> dict:
    """The run-config overrides of a preset (TOML file or ``"k=v ..."``) plus
    ``overrides`` (``"k=v ..."`` strings, TOML values), later ones winning.

    ``flwr run`` accepts a TOML file *or* key-value pairs, not both; merging
    them here lets a preset be varied on the command line.
    """
    from flwr.common.config import parse_config_args

    merged: dict = {}
    if run_config:
        path = Path(run_config)
        merged.update(tomllib.loads(path.read_text()) if path.is_file() else parse_config_args([run_config]))
    if overrides:
        merged.update(parse_config_args(list(overrides)))
    return merged


def run_config_value(app: Path, merged: dict, key: str) -> object:
    """A key of the effective run config: the override, else the app's default."""
    if key in merged:
        return merged[key]
    return tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"][key]


def run_status(env: dict[str, str], run_id: str, timeout: float = 120.0) -> dict:
    """Wait until the run is finished and return its ``flwr ls`` record."""
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(
            ["flwr", "ls", "--run-id", run_id, "--format", "json"],
            env=env, capture_output=True, text=True, timeout=60,
        )
        try:
            runs = json.loads(out.stdout).get("runs", [])
        except json.JSONDecodeError:
            runs = []
        if runs and str(runs[0].get("status", "")).startswith("finished"):
            return runs[0]
        if time.monotonic() > deadline:
            return runs[0] if runs else {"status": "unknown", "status-details": out.stdout + out.stderr}
        time.sleep(1.0)
