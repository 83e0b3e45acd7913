"""``nmoe-deploy-loopback``: the app on Flower's deployment engine, on 127.0.0.1, with TLS.

What a real deployment does, on one machine:

1. make a CA and a SuperLink certificate for ``127.0.0.1``/``localhost``
   (``cryptography``), and one authentication key pair per SuperNode;
2. start ``flower-superlink`` with TLS and SuperNode authentication;
3. register every SuperNode's public key (``flwr supernode register``);
4. start N ``flower-supernode`` processes, each with its own
   ``--node-config "partition-id=<i> num-partitions=<N> data-dir=... output-dir=..."``
   and its own port;
5. ``flwr run <app> loopback --run-config <preset> --stream``, then read the
   run's status with ``flwr ls`` (``flwr run --stream`` exits 0 even on failure);
6. stop the SuperNodes, then the SuperLink, each with its whole process tree,
   also when something failed.

Exits 0 only when the run is ``finished:completed`` and its results.json says
``completed``. Prints the per-round latency of stage 1.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

from ..config import ConfigError
from .flwr_process import (
    TIMEOUT_EXIT_CODE,
    free_port,
    merged_run_config,
    offline_env,
    run_status,
    stream_flwr_run,
    validated_run_config,
    wait_healthy,
    write_run_config,
)
from .process_tree import stop_tree, tree_marker


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1/localhost (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    validity = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=30))

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (
        x509.CertificateBuilder().subject_name(name("nmoe-flwr loopback CA")).issuer_name(name("nmoe-flwr loopback CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(validity[0]).not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(validity[0]).not_valid_after(validity[1])
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    paths["key"].chmod(0o600)
    return paths


def make_auth_keys(folder: Path, name: str) -> tuple[Path, Path]:
    """An OpenSSH EC (P-384) key pair for SuperNode authentication."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return private, public


def _joins(log: Path) -> int:
    """How many times a SuperNode logging to ``log`` was taken by the SuperLink."""
    return log.read_text(errors="replace").count("SuperNode ID:") if log.exists() else 0


class _Child:
    """A child process logging to ``log`` (appended), stopped with its whole tree by :meth:`stop`.

    Each start gets a fresh tree marker, so the ClientApp processes a
    SuperNode starts are found even when they outlive it (re-parented orphans).
    """

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.cmd, self.log = cmd, log
        self.marker_name, self.marker = tree_marker()
        with log.open("a") as fh:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(cmd, env={**env, self.marker_name: self.marker}, stdout=fh,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def tree(self) -> str:
        """``NAME=value`` of the environment entry every process of this start carries."""
        return f"{self.marker_name}={self.marker}"

    def stop(self) -> None:
        """Stop the process and everything it started (also after it was killed)."""
        stop_tree(self.proc, marker=self.tree)


class LoopbackDeployment:
    """A SuperLink and ``num_nodes`` SuperNodes on 127.0.0.1, with TLS and SuperNode authentication.

    A context manager: entering starts the SuperLink, registers one key pair
    per SuperNode and starts the SuperNodes; leaving stops the SuperNodes,
    then the SuperLink, each with its whole process tree, also on errors.
    :meth:`kill_node` and :meth:`restart_node` do to one SuperNode what a
    device that loses power and boots again does (same key, same
    ``--node-config``), which is how the tests check what a run survives.

    Parameters
    ----------
    app, workdir : Path
        The Flower app; the folder for certificates, logs, state and outputs.
    num_nodes : int
    node_configs : list of str, optional
        ``--node-config`` of each SuperNode (default: its partition id and
        ``<workdir>/node-<i>`` as output dir).
    extra_env : dict, optional
        Environment of every process started (e.g. Flower's
        ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``).
    """

    def __init__(
        self,
        app: Path,
        workdir: Path,
        num_nodes: int,
        node_configs: list[str] | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.app, self.workdir = app.resolve(), workdir.resolve()
        self.num_nodes = num_nodes
        self.node_configs = node_configs or [
            f'partition-id={i} num-partitions={num_nodes} output-dir="{self.workdir / f"node-{i}"}"'
            for i in range(num_nodes)
        ]
        self.home = self.workdir / "flwr-home"
        self.env = {**offline_env(self.home), "FLWR_HOME": str(self.home),
                    "NMOE_OUTPUT_DIR": str(self.workdir / "server-out"), **(extra_env or {})}
        self.port = 0
        self.superlink: _Child | None = None
        self.nodes: dict[int, _Child] = {}
        self._keys: dict[int, Path] = {}

    def __enter__(self) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        certs = self.certs = make_certificates(self.workdir / "certs")
        self.port = free_port()
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{certs["ca"]}"\n'
        )
        try:
            self.superlink = _Child([
                "flower-superlink", "--ssl-ca-certfile", str(certs["ca"]), "--ssl-certfile", str(certs["cert"]),
                "--ssl-keyfile", str(certs["key"]), "--host", "127.0.0.1", "--port", str(self.port),
                "--database", str(self.workdir / "state.db"), "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
            ], self.env, self.workdir / "superlink.log")
            wait_healthy(f"https://127.0.0.1:{self.port}/health",
                         context=ssl.create_default_context(cafile=str(certs["ca"])))
            for i in range(self.num_nodes):
                private, public = make_auth_keys(self.workdir / "certs", f"supernode-{i}")
                subprocess.run(["flwr", "supernode", "register", str(public), "loopback"], env=self.env,
                               check=True, capture_output=True, text=True, timeout=60)
                self._keys[i] = private
                self.nodes[i] = self._start_node(i)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for node in self.nodes.values():  # SuperNodes first: they would retry a missing SuperLink
            node.stop()
        if self.superlink is not None:
            self.superlink.stop()

    def _start_node(self, i: int) -> _Child:
        # The SuperNodes stand for separate devices but share this machine's cores: give each its share of
        # torch threads (a client uses all cores by default, and 3 x 2 threads on 2 cores thrash).
        threads = str(max(1, (os.cpu_count() or 1) // self.num_nodes))
        env = {"OMP_NUM_THREADS": threads, **self.env}
        return _Child([
            "flower-supernode", "--superlink", f"127.0.0.1:{self.port}",
            "--root-certificates", str(self.certs["ca"]), "--auth-supernode-private-key", str(self._keys[i]),
            "--port", str(free_port()), "--node-config", self.node_configs[i],
        ], env, self.workdir / f"supernode-{i}.log")

    def kill_node(self, i: int) -> _Child:
        """``kill -9`` SuperNode ``i`` (only that process, as a power loss would) and reap it; return it.

        Its SuperExec and ClientApp are left to notice on their own: Flower
        starts them with ``--parent-pid`` and they exit when their parent is gone.
        """
        node = self.nodes[i]
        os.kill(node.proc.pid, signal.SIGKILL)
        node.proc.wait()  # a zombie still "exists" for Flower's parent-PID monitors
        return node

    def restart_node(self, i: int, timeout: float = 180.0) -> int:
        """Start SuperNode ``i`` again with its key and ``--node-config`` until the SuperLink takes it.

        The SuperLink refuses a node whose earlier self it still counts as
        online (up to 60 s after its last heartbeat) and the SuperNode then
        exits; a device's service manager restarts it (Docker's ``restart:``
        policy, systemd's ``Restart=``), and so does this loop, every 5 s.
        A start has joined once it logs its node id (Flower writes
        ``SuperNode ID:`` only after the SuperLink took it). A message that
        was in flight to the dead node is answered as lost by the ServerApp
        (:class:`~nmoe_flwr.strategies.restart_watch.RestartAwareGrid`).

        Returns
        -------
        int
            Starts it took.

        Raises
        ------
        TimeoutError
            Not taken within ``timeout`` seconds.
        """
        deadline, attempts = time.monotonic() + timeout, 0
        log = self.workdir / f"supernode-{i}.log"
        while time.monotonic() < deadline:
            attempts += 1
            joined_before = _joins(log)
            node = self.nodes[i] = self._start_node(i)
            while node.proc.poll() is None and time.monotonic() < deadline:
                if _joins(log) > joined_before:
                    return attempts
                time.sleep(0.5)
            time.sleep(5.0)
        raise TimeoutError(f"SuperNode {i} was not taken back within {timeout:g} s ({attempts} starts)")

    def run(self, run_config_file: Path, timeout: float) -> tuple[str | None, dict]:
        """``flwr run --stream`` the app with a run config file; ``(run id, flwr ls record or {})``."""
        cmd = ["flwr", "run", str(self.app), "loopback", "--stream", "--run-config", str(run_config_file)]
        run_id, code = stream_flwr_run(cmd, self.env, self.app, self.workdir / "run.log", timeout)
        if code == TIMEOUT_EXIT_CODE:
            return run_id, {"status": "timed-out", "status-details": f"flwr run did not finish within {timeout:g} s"}
        return run_id, (run_status({**self.env}, run_id) if run_id else {})


def deploy(
    app: Path,
    run_config: str,
    num_nodes: int,
    workdir: Path,
    overrides: list[str] | None = None,
    node_configs: list[str] | None = None,
    timeout: float = 1800.0,
    during: Callable[[LoopbackDeployment], None] | None = None,
    extra_env: dict[str, str] | None = None,
) -> dict:
    """Run ``run_config`` on a loopback deployment; return status, results and timings.

    ``during``, if given, is called in a thread with the deployment once
    ``flwr run`` has started (the tests kill and restart SuperNodes from it);
    its exception, if any, is re-raised after the run. ``extra_env`` goes to
    every process of the deployment.
    """
    merged = merged_run_config(run_config, overrides)
    validated_run_config(app.resolve(), merged)  # raises ConfigError naming the key, before any process starts
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config_file = write_run_config(merged, workdir / "run-config.toml")
    run_name = str(merged.get("run-name", ""))
    t_start = time.perf_counter()
    failure: list[BaseException] = []
    with LoopbackDeployment(app, workdir, num_nodes, node_configs, extra_env) as deployment:
        worker = None
        if during is not None:
            def _during() -> None:
                try:
                    during(deployment)
                except BaseException as exc:  # noqa: BLE001 -- handed to the caller, raised after the run
                    failure.append(exc)
            worker = threading.Thread(target=_during, name="deploy-during", daemon=True)
            worker.start()
        run_id, record = deployment.run(config_file, timeout)
        if worker is not None:
            worker.join(timeout=60)
    if failure:
        raise failure[0]
    outcome: dict = {"status": record.get("status", "not-started"), "details": record.get("status-details"),
                     "run-id": run_id, "wall-seconds": time.perf_counter() - t_start}
    results_path = workdir / "server-out" / (run_name or f"run-{run_id}") / "results.json"
    if results_path.exists():
        results = json.loads(results_path.read_text())
        outcome["results"] = str(results_path)
        outcome["results-status"] = results["run"]["status"]
        timings = results["timings-s"]
        rounds = int(merged.get("fedce-rounds", 0)) or None
        if rounds and "stage1-fedce" in timings:
            outcome["stage1-seconds-per-round"] = timings["stage1-fedce"] / rounds
    return outcome


def main(argv: list[str] | None = None) -> int:
    """Console entry point."""
    # SIGTERM raises SystemExit like Ctrl-C raises KeyboardInterrupt, so the ExitStack in deploy()
    # stops the SuperLink, the SuperNodes and their ClientApps on the way out (issue 12 found 13 left).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(prog="nmoe-deploy-loopback", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--app", type=Path, default=Path("."))
    parser.add_argument("--run-config", default="configs/deploy-smoke.toml", help="preset TOML")
    parser.add_argument("--set", action="append", default=[], help='"key=value ..." overrides')
    parser.add_argument("--nodes", type=int, default=3, help="SuperNodes (= num-clients of the preset)")
    parser.add_argument("--workdir", type=Path, default=Path("outputs/deploy-loopback"),
                        help="certificates, logs, state and outputs of the deployment")
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args(argv)
    try:
        outcome = deploy(args.app, args.run_config, args.nodes, args.workdir, args.set, timeout=args.timeout)
    except ConfigError as exc:
        print(f"nmoe-deploy-loopback: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(outcome, indent=2))
    ok = outcome.get("status") == "finished:completed" and outcome.get("results-status") == "completed"
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
