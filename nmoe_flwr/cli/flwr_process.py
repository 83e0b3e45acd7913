"""Processes of Flower's CLI and engines, shared by every ``nmoe-*`` command.

Offline environment, free loopback ports, a simulation SuperLink, streaming
``flwr run`` with a deadline that holds for a silent run too, and reading a
run's final status (``flwr run --stream`` exits 0 even when the run failed).
Every process started here is stopped with its whole tree
(:mod:`.process_tree`).
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import re
import selectors
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import tomllib

from .process_tree import stop_tree, tree_marker

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


#: Exit code :func:`stream_flwr_run` returns when it gave up on the command (as coreutils' ``timeout``).
TIMEOUT_EXIT_CODE = 124


def stream_flwr_run(
    cmd: list[str],
    env: dict[str, str],
    cwd: Path,
    log_file: Path | None,
    timeout: float,
    *,
    grace: float = 5.0,
) -> tuple[str | None, int]:
    """Run ``cmd`` (``flwr run ... --stream``), echoing its output, within ``timeout`` s.

    Output (stdout and stderr together) goes line by line to stdout and, if
    given, to ``log_file`` (line-buffered, so ``tail -f`` works). The deadline
    holds whether or not the command prints anything: once ``timeout`` s have
    passed, a line saying so is written to both, and the command and every
    process it started are stopped with :func:`stop_tree` (SIGTERM, SIGKILL
    after ``grace`` s). The same happens if this function is interrupted
    (Ctrl-C, ``SystemExit`` from a SIGTERM handler), before the exception
    propagates.

    Returns
    -------
    tuple
        ``(run id or None, exit code)``: the id from the first ``Successfully
        started run <id>`` line, and the command's exit status (negative: the
        signal that ended it), or :data:`TIMEOUT_EXIT_CODE` (124) if it timed
        out.
    """
    print("+ " + shlex.join(cmd), flush=True)
    name, value = tree_marker()
    marker = f"{name}={value}"
    run_id = None
    log = log_file.open("w", buffering=1) if log_file else None

    def emit(text: str) -> None:
        nonlocal run_id
        sys.stdout.write(text)
        sys.stdout.flush()
        if log:
            log.write(text)
        if run_id is None and (m := RUN_ID.search(text)):
            run_id = m.group(1)

    try:
        # Its own session, so that what it starts can be told from ours and stopped with it
        # (and a terminal's Ctrl-C reaches us, which then stops it, instead of racing us).
        proc = subprocess.Popen(
            cmd, env={**env, name: value}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            cwd=cwd, start_new_session=True,
        )
        try:
            code = _pump(proc, emit, time.monotonic() + timeout)
        except BaseException:
            stop_tree(proc, grace, marker=marker)
            raise
        if code is None:
            emit(f"[nmoe] {shlex.join(cmd[:2])} timed out after {timeout:g} s: stopping it and its processes\n")
            stop_tree(proc, grace, marker=marker)
            _pump(proc, emit, time.monotonic() + 1.0)  # what it printed while being stopped
            code = TIMEOUT_EXIT_CODE
        return run_id, code
    finally:
        if log:
            log.close()


def _pump(proc: subprocess.Popen, emit: Callable[[str], None], deadline: float) -> int | None:
    """Pass ``proc``'s output to ``emit``, whole lines at a time, until it has exited.

    Returns its exit code, or None at ``deadline`` (a partial last line is
    passed on first). Never blocks past ``deadline``: the pipe is only read
    when ``select`` says it has data, and the final wait is bounded too.
    """
    assert proc.stdout is not None
    if not proc.stdout.closed:
        fd = proc.stdout.fileno()
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        pending, eof = "", False
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while not eof and (remaining := deadline - time.monotonic()) > 0:
                if not sel.select(remaining):
                    continue
                chunk = os.read(fd, 65536)
                eof = not chunk
                pending += decoder.decode(chunk, final=eof)
                # Universal newlines, as text mode does; a trailing "\r" may be half of a "\r\n".
                hold = "\r" if pending.endswith("\r") and not eof else ""
                *lines, rest = pending[: len(pending) - len(hold)].replace("\r\n", "\n").replace("\r", "\n").split("\n")
                pending = rest + hold
                if lines:
                    emit("".join(f"{line}\n" for line in lines))
        if pending:
            emit(pending.rstrip("\r") + "\n")
        if not eof:
            return None
        proc.stdout.close()
    # Output closed; the process itself may still be finishing, or hang on silently.
    try:
        return proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return None


def write_run_config(merged: dict, path: Path) -> Path:
    """The merged run config as the single TOML file ``flwr run`` accepts."""
    import tomli_w

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(merged))
    return path


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """Within the block, SIGTERM raises ``SystemExit(143)`` like Ctrl-C raises ``KeyboardInterrupt``.

    A plain ``kill`` of a launcher would otherwise end Python without running
    any ``finally``, leaving its SuperLink and Ray behind; with this, the
    cleanup of :func:`local_superlink` runs. The previous handler is restored
    on leaving. Signal handlers belong to the main thread: elsewhere this does
    nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def local_superlink(env: dict[str, str], workdir: Path, timeout: float = 60.0) -> Iterator[dict[str, str]]:
    """Start a simulation SuperLink on free ports and stop its whole tree after.

    Yields
    ------
    dict
        ``env`` plus the variables that point ``flwr``'s ``:local:``
        connection at this SuperLink. On leaving the block (also on errors),
        the SuperLink, SuperExec, ServerApp and all of Ray's processes have
        exited (:func:`stop_tree`; raises :class:`ProcessTreeError` if some
        did not even after SIGKILL).
    """
    http_port, control_port = free_port(), free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [
        "flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
        "--control-api-address", f"127.0.0.1:{control_port}",
        "--host", "127.0.0.1", "--port", str(http_port),
        "--database", str(workdir / "state.db"),
        "--log-file", str(workdir / "superlink.log"),
    ]
    # The marker reaches SuperExec, the ServerApp and every Ray process (they inherit the
    # SuperLink's environment), so stop_tree finds them even once re-parented; it is not in
    # the yielded environment, which `flwr run`/`flwr ls` use and which are not ours to stop.
    name, value = tree_marker()
    proc = subprocess.Popen(
        cmd, env={**env, name: value}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_healthy(f"http://127.0.0.1:{http_port}/health", timeout, proc=proc, log=workdir / "superlink.log")
        yield {
            **env,
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
            "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        }
    finally:
        stop_tree(proc, marker=f"{name}={value}")


KEY_VALUE = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")
"""One ``key=value`` pair as ``flwr run --run-config`` reads it (the pattern of ``flwr.common.config.parse_config_args``)."""


def merged_run_config(run_config: str | Mapping[str, object] | None, overrides: list[str] | None = None) -> dict:
    """The run-config overrides of a preset (TOML file, ``"k=v ..."`` or an
    already parsed mapping, e.g. a killed run's recorded config) plus
    ``overrides`` (``"k=v ..."`` strings, TOML values), later ones winning.

    ``flwr run`` accepts a TOML file *or* key-value pairs, not both; merging
    them here lets a preset be varied on the command line.

    Raises
    ------
    nmoe_flwr.config.ConfigError
        A string that is not ``key=value`` pairs (e.g. an unquoted string value).
    """
    from click import ClickException
    from flwr.common.config import parse_config_args

    from ..config import ConfigError

    def parsed(text: str) -> dict:
        # Flower's parser silently skips what is not key=value ("tau", "tau=0.5 seed"): refuse it instead.
        leftover = KEY_VALUE.sub("", text).split()
        if leftover:
            raise ConfigError(f'cannot parse "{text}" as key=value pairs: {" ".join(leftover)!r} has no "=value" '
                              f'(expected e.g. tau=0.3 run-name="x")')
        try:
            return parse_config_args([text])
        except ClickException as exc:  # Flower's message does not say which string, nor that strings need quotes
            raise ConfigError(f'cannot parse "{text}" as key=value pairs (TOML values; strings in double quotes, '
                              f"e.g. run-name=\"x\"): {exc.message}") from None

    merged: dict = {}
    if isinstance(run_config, Mapping):
        merged.update(run_config)
    elif run_config:
        path = Path(run_config)
        merged.update(tomllib.loads(path.read_text()) if path.is_file() else parsed(run_config))
    for text in overrides or ():
        merged.update(parsed(text))
    return merged


def validated_run_config(app: Path, merged: dict):
    """The app's defaults plus ``merged``, parsed into a :class:`~nmoe_flwr.config.RunConfig`.

    Called by the launchers before any process starts, so that a typo'd key
    or a bad value is reported here, naming the key, instead of as Flower's
    bare "Invalid run configuration." with the reason only in the SuperLink's log.

    Raises
    ------
    nmoe_flwr.config.ConfigError
    """
    from ..config import parse_run_config

    defaults = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return parse_run_config({**defaults, **merged})


def checked_run_config(prog: str, app: Path, run_config: str | None, overrides: list[str]) -> dict:
    """:func:`merged_run_config`, validated by :func:`validated_run_config`, for a
    launcher of several runs: a bad override string, key or value ends the
    command at once (``<prog>: <reason>`` on stderr, exit status 2) instead of
    failing the first of many runs, or the tenth.
    """
    from ..config import ConfigError

    try:
        merged = merged_run_config(run_config, overrides)
        validated_run_config(app.resolve(), merged)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
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
            env=env, capture_output=True, text=True, timeout=60, check=False,
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
