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

``nmoe-run --resume <output-dir>/<run-name>`` continues a run that was killed,
with the config it recorded, from its checkpoints
(:mod:`nmoe_flwr.pipelines.resume`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from ..config import ConfigError
from .flwr_process import (
    TIMEOUT_EXIT_CODE,
    local_superlink,
    merged_run_config,
    offline_env,
    run_config_value,
    run_status,
    sigterm_exits,
    stream_flwr_run,
    validated_run_config,
    write_run_config,
)


def launch(
    app: Path,
    run_config: str | Mapping[str, object] | None = None,
    num_supernodes: int | None = None,
    cpus_per_client: int = 1,
    gpus_per_client: float = 0.0,
    flwr_home: Path | None = None,
    timeout: float = 6 * 3600,
    log_file: Path | None = None,
    extra_env: dict[str, str] | None = None,
    overrides: list[str] | None = None,
    check_config: bool = True,
) -> tuple[str, dict]:
    """Run the app through ``flwr run`` and return ``(status, flwr ls record)``.

    Streams the run's log to stdout (and to ``log_file`` if given);
    ``extra_env`` reaches the ServerApp and ClientApps (e.g. ``NMOE_OUTPUT_DIR``);
    ``overrides`` (``"k=v ..."``) are applied on top of ``run_config`` (a preset
    file, ``"k=v ..."`` or a parsed mapping such as :func:`resume_config`'s).
    The merged config is validated first (:class:`~nmoe_flwr.config.ConfigError`
    names the key); ``check_config=False`` leaves that to the ServerApp, as a
    plain ``flwr run`` would.

    Every launch writes its merged config, its SuperLink's database and log,
    and its ``FLWR_HOME`` (Flower's config and installed app copy) into a
    folder of its own under ``<flwr_home>/launches/``, so launches from one
    checkout can run side by side; the folder is removed once the run
    completed and kept (for its ``superlink.log``) otherwise.
    """
    app = app.resolve()
    flwr_home = (flwr_home or app / ".flwr").resolve()
    env = {**offline_env(flwr_home), **(extra_env or {})}
    # Where results go unless the run config says otherwise: the app's outputs/ folder
    # (the ServerApp's working directory is Flower's business, not the user's).
    env.setdefault("NMOE_OUTPUT_DIR", str(app / "outputs"))
    merged = merged_run_config(run_config, overrides)
    if check_config:
        validated_run_config(app, merged)  # raises ConfigError naming the key, before anything starts
    n = num_supernodes or int(run_config_value(app, merged, "num-clients"))
    federation = f"num-supernodes={n} client-resources-num-cpus={cpus_per_client}"
    if gpus_per_client:
        federation += f" client-resources-num-gpus={gpus_per_client}"
    cmd = ["flwr", "run", str(app), "--stream", "--federation-config", federation]
    (flwr_home / "launches").mkdir(parents=True, exist_ok=True)
    # One folder per launch: two launches sharing a run-config file or a SuperLink database swap configs.
    workdir = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=flwr_home / "launches"))
    # Flower re-installs the app into $FLWR_HOME/apps/<hash> at every run, removing the old copy first: a launch
    # sharing FLWR_HOME with a concurrent one could start from a half-written copy ("Cannot find pyproject.toml").
    env["FLWR_HOME"] = str(workdir / "flwr-home")
    if overrides or isinstance(run_config, Mapping):
        cmd += ["--run-config", str(write_run_config(merged, workdir / "run-config.toml"))]
    elif run_config:
        cmd += ["--run-config", run_config]
    t0 = time.perf_counter()
    # sigterm_exits: a `kill` of whichever command called this still stops the SuperLink and Ray.
    with sigterm_exits(), local_superlink(env, workdir / "superlink") as link_env:
        run_id, code = stream_flwr_run(cmd, link_env, app, log_file, timeout)
        if code == TIMEOUT_EXIT_CODE:
            return "timed-out", {"status": "timed-out", "run-id": run_id, "status-details": f"no result within {timeout:g} s"}
        if run_id is None:
            return "not-started", {"status": "not-started", "status-details": f"flwr run exited {code}"}
        record = run_status(link_env, run_id)
        # Until the run had finished (results written), before tearing the SuperLink and Ray down.
        record["seconds-until-finished"] = time.perf_counter() - t0
    status = str(record.get("status"))
    if status == "finished:completed":
        shutil.rmtree(workdir, ignore_errors=True)
    return status, record


def resume_config(run_dir: Path) -> dict:
    """The config a killed run recorded in ``<run_dir>/results.json``, set to resume it in place.

    Raises
    ------
    FileNotFoundError, ValueError
        No results.json there, or one without a config section.
    """
    from ..config import RunConfig

    results = run_dir / "results.json"
    if not results.is_file():
        raise FileNotFoundError(f"{results} does not exist: --resume takes the folder of a run (<output-dir>/<run-name>)")
    config = json.loads(results.read_text()).get("config")
    if not config:
        raise ValueError(f"{results} records no config")
    fields = {name.replace("_", "-"): f for name, f in RunConfig.model_fields.items()}
    for key, value in config.items():  # results.json writes non-finite floats as strings
        if isinstance(value, str) and key in fields and fields[key].annotation in (float, "float"):
            config[key] = float(value)
    run_dir = run_dir.resolve()
    return {**config, "resume": True, "output-dir": str(run_dir.parent), "run-name": run_dir.name}


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
    parser.add_argument(
        "--resume", type=Path, metavar="RUN_DIR",
        help="continue a killed run from its checkpoints: its folder <output-dir>/<run-name> (its own config is used)",
    )
    parser.add_argument("--num-supernodes", type=int, help="virtual clients (default: num-clients of the run config)")
    parser.add_argument("--cpus-per-client", type=int, default=1, help="client-resources-num-cpus (default 1: one torch thread per client)")
    parser.add_argument("--gpus-per-client", type=float, default=0.0, help="client-resources-num-gpus, e.g. 0.1 to share one GPU by 10 clients")
    parser.add_argument("--flwr-home", type=Path, help="where launches keep their state: each gets its own FLWR_HOME under <this>/launches/ (default: <app>/.flwr)")
    parser.add_argument("--log-file", type=Path, help="also write the streamed log here")
    parser.add_argument("--timeout", type=float, default=6 * 3600, help="seconds before the run is abandoned")
    args = parser.parse_args(argv)
    run_config: str | dict | None = args.run_config
    if args.resume:
        if args.run_config or args.set:
            parser.error("--resume uses the run's own config; it takes no --run-config or --set")
        try:
            config = resume_config(args.resume)
        except (OSError, ValueError) as exc:
            print(f"nmoe-run: {exc}", file=sys.stderr)
            return 2
        run_config = config  # launch writes it into its own folder
    try:
        status, record = launch(
            args.app, run_config, args.num_supernodes, args.cpus_per_client, args.gpus_per_client,
            args.flwr_home, args.timeout, args.log_file, overrides=args.set,
        )
    except ConfigError as exc:
        print(f"nmoe-run: {exc}", file=sys.stderr)
        return 2
    print(f"run {record.get('run-id', '?')}: {status} {record.get('status-details', '')}".rstrip(), flush=True)
    return 0 if status == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
