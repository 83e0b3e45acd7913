"""``nmoe-run``: ``flwr run`` in local simulation, offline, with a real exit status.

``flwr run --stream`` exits 0 even when the run failed, and its ``:local:``
SuperLink keeps running after the CLI exits. This launcher

1. sets the offline environment (``FLWR_HOME``, no telemetry, no update
   check, no runtime dependency installation, a private ``RAY_TMPDIR``),
2. starts its own simulation SuperLink on free loopback ports and points
   ``:local:`` at it,
3. runs ``flwr run <app> --stream`` with ``num-supernodes`` = ``num-clients``
   of the run config (unless given),
4. reads the run's final status with ``flwr ls --run-id ... --format json``,
5. stops the SuperLink and every process it started (the whole process
   tree, Ray included), also on Ctrl-C, SIGTERM or errors,

and exits 0 only for ``finished:completed``.
"""

from __future__ import annotations

import argparse
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


def launch(
    app: Path,
    run_config: str | None = None,
    num_supernodes: int | None = None,
    cpus_per_client: int = 1,
    gpus_per_client: float = 0.0,
    flwr_home: Path | None = None,
    timeout: float = 6 * 3600,
    log_file: Path | None = None,
    extra_env: dict[str, str] | None = None,
    overrides: list[str] | None = None,
) -> tuple[str, dict]:
    """Run the app through ``flwr run`` and return ``(status, flwr ls record)``.

    Streams the run's log to stdout (and to ``log_file`` if given);
    ``extra_env`` reaches the ServerApp and ClientApps (e.g. ``NMOE_OUTPUT_DIR``);
    ``overrides`` (``"k=v ..."``) are applied on top of ``run_config``.
    """
    app = app.resolve()
    flwr_home = (flwr_home or app / ".flwr").resolve()
    env = {**offline_env(flwr_home), **(extra_env or {})}
    # Where results go unless the run config says otherwise: the app's outputs/ folder
    # (the ServerApp's working directory is Flower's business, not the user's).
    env.setdefault("NMOE_OUTPUT_DIR", str(app / "outputs"))
    merged = merged_run_config(run_config, overrides)
    n = num_supernodes or int(run_config_value(app, merged, "num-clients"))
    federation = f"num-supernodes={n} client-resources-num-cpus={cpus_per_client}"
    if gpus_per_client:
        federation += f" client-resources-num-gpus={gpus_per_client}"
    cmd = ["flwr", "run", str(app), "--stream", "--federation-config", federation]
    if overrides:
        cmd += ["--run-config", str(write_run_config(merged, flwr_home / "run-config.toml"))]
    elif run_config:
        cmd += ["--run-config", run_config]
    t0 = time.perf_counter()
    with local_superlink(env, flwr_home / "superlink") as link_env:
        run_id, code = stream_flwr_run(cmd, link_env, app, log_file, timeout)
        if run_id is None:
            return "not-started", {"status": "not-started", "status-details": f"flwr run exited {code}"}
        record = run_status(link_env, run_id)
        # Until the run had finished (results written), before tearing the SuperLink and Ray down.
        record["seconds-until-finished"] = time.perf_counter() - t0
    return str(record.get("status")), record


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``nmoe-run``."""
    # SIGTERM (kill, CI timeouts) raises SystemExit like Ctrl-C raises KeyboardInterrupt,
    # so the SuperLink and everything it started are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(
        prog="nmoe-run",
        description="Run the NMoE Flower app in local simulation (offline) and exit non-zero unless "
        "the run finished:completed. Starts and stops its own SuperLink.",
    )
    parser.add_argument("--app", type=Path, default=Path("."), help="Flower app folder (default: .)")
    parser.add_argument("--run-config", help='preset TOML file (e.g. configs/smoke.toml) or "key=value ..." overrides')
    parser.add_argument(
        "--set", action="append", default=[], metavar='"KEY=VALUE ..."',
        help="override keys on top of --run-config (TOML values, e.g. --set \"fedsc-rounds=10 dp-epsilon=inf\"); repeatable",
    )
    parser.add_argument("--num-supernodes", type=int, help="virtual clients (default: num-clients of the run config)")
    parser.add_argument("--cpus-per-client", type=int, default=1, help="client-resources-num-cpus (default 1: one torch thread per client)")
    parser.add_argument("--gpus-per-client", type=float, default=0.0, help="client-resources-num-gpus, e.g. 0.1 to share one GPU by 10 clients")
    parser.add_argument("--flwr-home", type=Path, help="FLWR_HOME (default: <app>/.flwr)")
    parser.add_argument("--log-file", type=Path, help="also write the streamed log here")
    parser.add_argument("--timeout", type=float, default=6 * 3600, help="seconds before the run is abandoned")
    args = parser.parse_args(argv)
    status, record = launch(
        args.app, args.run_config, args.num_supernodes, args.cpus_per_client, args.gpus_per_client,
        args.flwr_home, args.timeout, args.log_file, overrides=args.set,
    )
    print(f"run {record.get('run-id', '?')}: {status} {record.get('status-details', '')}".rstrip(), flush=True)
    return 0 if status == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
