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
import signal
import ssl
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

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


@contextmanager
def _process(cmd: list[str], env: dict[str, str], log: Path):
    """A child process (logging to ``log``) stopped with its whole tree on exit.

    Each gets its own tree marker, so the ClientApp processes a SuperNode
    starts are found even when they outlive it (re-parented orphans).
    """
    fh = log.open("w")
    name, value = tree_marker()
    proc = subprocess.Popen(cmd, env={**env, name: value}, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        stop_tree(proc, marker=f"{name}={value}")
        fh.close()


def deploy(
    app: Path,
    run_config: str,
    num_nodes: int,
    workdir: Path,
    overrides: list[str] | None = None,
    node_configs: list[str] | None = None,
    timeout: float = 1800.0,
) -> dict:
    """Run ``run_config`` on a loopback deployment; return status, results and timings."""
    app, workdir = app.resolve(), workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    home = workdir / "flwr-home"
    env = {**offline_env(home), "FLWR_HOME": str(home), "NMOE_OUTPUT_DIR": str(workdir / "server-out")}
    certs = make_certificates(workdir / "certs")
    port = free_port()
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{certs["ca"]}"\n'
    )
    merged = merged_run_config(run_config, overrides)
    validated_run_config(app, merged)  # raises ConfigError naming the key, before any process starts
    config_file = write_run_config(merged, workdir / "run-config.toml")
    run_name = str(merged.get("run-name", ""))
    outcome: dict = {"status": "not-started"}
    t_start = time.perf_counter()
    with ExitStack() as stack:
        stack.enter_context(_process([
            "flower-superlink", "--ssl-ca-certfile", str(certs["ca"]), "--ssl-certfile", str(certs["cert"]),
            "--ssl-keyfile", str(certs["key"]), "--host", "127.0.0.1", "--port", str(port),
            "--database", str(workdir / "state.db"), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
        ], env, workdir / "superlink.log"))
        wait_healthy(
            f"https://127.0.0.1:{port}/health", context=ssl.create_default_context(cafile=str(certs["ca"]))
        )
        # SuperNodes are entered after the SuperLink, so the stack stops them first.
        for i in range(num_nodes):
            private, public = make_auth_keys(workdir / "certs", f"supernode-{i}")
            subprocess.run(["flwr", "supernode", "register", str(public), "loopback"], env=env, check=True,
                           capture_output=True, text=True, timeout=60)
            node_config = (node_configs[i] if node_configs else
                           f'partition-id={i} num-partitions={num_nodes} output-dir="{workdir / f"node-{i}"}"')
            stack.enter_context(_process([
                "flower-supernode", "--superlink", f"127.0.0.1:{port}", "--root-certificates", str(certs["ca"]),
                "--auth-supernode-private-key", str(private), "--port", str(free_port()), "--node-config", node_config,
            ], env, workdir / f"supernode-{i}.log"))
        cmd = ["flwr", "run", str(app), "loopback", "--stream", "--run-config", str(config_file)]
        run_id, code = stream_flwr_run(cmd, env, app, workdir / "run.log", timeout)
        if code == TIMEOUT_EXIT_CODE:
            outcome = {"status": "timed-out", "details": f"flwr run did not finish within {timeout:g} s", "run-id": run_id}
        elif run_id:
            record = run_status({**env}, run_id)
            outcome = {"status": record.get("status"), "details": record.get("status-details"), "run-id": run_id}
    outcome["wall-seconds"] = time.perf_counter() - t_start
    results_path = workdir / "server-out" / (run_name or f"run-{outcome.get('run-id')}") / "results.json"
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
