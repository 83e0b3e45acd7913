"""End to end through ``flwr run`` (local simulation): the smoke preset completes,
a bad config value fails the run, and no process is left behind."""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import processes_mentioning

from nmoe_flwr.cli.run import launch
from nmoe_flwr.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _env(tmp: Path) -> dict[str, str]:
    # A private, short RAY_TMPDIR (Ray's socket paths must stay under 107 bytes).
    ray = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))
    (tmp / "ray-tmpdir").write_text(str(ray))
    return {"NMOE_OUTPUT_DIR": str(tmp / "out"), "RAY_TMPDIR": str(ray)}


def _launch_preset(name: str, tmp: Path, timeout: float = 420) -> tuple[str, dict]:
    """Run ``configs/<name>.toml`` through nmoe-run with everything under ``tmp``."""
    return launch(
        ROOT, str(ROOT / "configs" / f"{name}.toml"), flwr_home=tmp / "flwr", timeout=timeout,
        log_file=tmp / "run.log", extra_env=_env(tmp),
    )


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smoke")
    status, record = _launch_preset("smoke", tmp)
    return status, record, tmp / "out" / "smoke", tmp


def test_smoke_preset_completes(smoke_run):
    status, record, _, tmp = smoke_run
    assert status == "finished:completed", (record, (tmp / "run.log").read_text()[-3000:])


def test_smoke_results_are_complete_and_above_chance(smoke_run):
    _, _, folder, _ = smoke_run
    results = json.loads((folder / "results.json").read_text())
    assert results["run"]["status"] == "completed"
    assert results["config"]["num-clients"] == 4 and results["config"]["tau"] == 0.1
    for method in ("nmoe", "fedce-classifier", "personalized-expert", "local-classifier", "centralized-moe"):
        assert set(results["results"][method]["per-client"]) == {"0", "1", "2", "3"}, method
        assert {"accuracy", "macro-f1"} <= set(results["results"][method]["mean"]), method
    nmoe = results["results"]["nmoe"]["mean"]
    assert nmoe["accuracy"] > 0.5  # chance is 0.1 over 10 classes
    per_client = results["results"]["nmoe"]["per-client"]
    assert nmoe["routed-to-neighbour"] == pytest.approx(sum(c["routed-to-neighbour"] for c in per_client.values()) / 4, rel=1e-12)
    # Routing diagnostics, oracles, the router ceiling and the pooled probes with their floors (issue 10).
    assert {"minority-to-owner", "dominant-sent-away"} <= set(nmoe)
    for method in ("oracle-class-owner", "oracle-best-expert", "router-ceiling"):
        assert set(results["results"][method]["per-client"]) == {"0", "1", "2", "3"}, method
    probe = results["stages"]["pooled-probe"]
    assert probe["train-samples"] == 4 * 300 and set(probe) >= {"raw-pixels", "random-init", "extractor"}
    assert probe["raw-pixels"]["knn-pooled-accuracy"] > 0.5
    for stage in ("stage1-fedce", "stage2-experts", "stage3-gate", "eval-nmoe", "total"):
        assert results["timings-s"][stage] > 0
    rows = (folder / "rounds.csv").read_text().splitlines()
    assert rows[0].startswith("stage,round") and len(rows) == 1 + 3 + 3  # fedce + gate rounds


def test_nmoe_stages_2_3_rerun_on_the_saved_stage_1(smoke_run, tmp_path):
    """extractor-checkpoint: a second run reuses the smoke run's extractor.pt and head.pt and trains no stage 1."""
    _, _, folder, _ = smoke_run
    status, record = launch(
        ROOT, str(ROOT / "configs" / "smoke.toml"), flwr_home=tmp_path / "flwr", timeout=420, log_file=tmp_path / "run.log",
        extra_env=_env(tmp_path),
        overrides=[(f'extractor-checkpoint="{folder / "extractor.pt"}" run-name="rerun" local-baseline=false '
                    "centralized-baseline=false pooled-probe=false")],
    )
    assert status == "finished:completed", (record, (tmp_path / "run.log").read_text()[-3000:])
    results = json.loads((tmp_path / "out" / "rerun" / "results.json").read_text())
    assert results["run"]["head-checkpoint"] == str(folder / "head.pt")
    assert "stage1-fedce" not in results["timings-s"] and "fedce-classifier" not in results["results"]
    assert set(results["results"]["nmoe"]["per-client"]) == {"0", "1", "2", "3"}
    saved = torch.load(tmp_path / "out" / "rerun" / "extractor.pt", weights_only=True)
    original = torch.load(folder / "extractor.pt", weights_only=True)
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)
    assert processes_mentioning(str(tmp_path)) == []


def test_gate_validation_script_trains_gates_on_the_smoke_runs_stores(smoke_run):
    """scripts/gate_validation.py: stage 3 again on the run's client stores, scored on held-out training samples."""
    _, _, folder, _ = smoke_run
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gate_validation.py"), "--seed", "0", "1", "--", str(folder),
         "gate-rounds=2", "gate-stay-margin=0.05"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    line = json.loads(out.stdout.splitlines()[-1])
    assert line["overrides"] == ["gate-rounds=2", "gate-stay-margin=0.05"]
    assert "split 0: gate round 2/2" in out.stderr and "split 1: gate round 2/2" in out.stderr
    assert line["val"]["accuracy"] > 0.5 and line["val"]["own-expert-accuracy"] > 0.5  # chance is 0.1
    assert {"macro-f1", "minority-to-owner", "dominant-sent-away"} <= set(line["val"])
    per_split = [s["accuracy"] for s in line["val-per-split"]]
    assert line["val"]["accuracy"] == pytest.approx(sum(per_split) / 2, abs=1e-4)


def test_bad_config_value_fails_the_run_fast(tmp_path):
    with pytest.raises(ConfigError, match="key 'tau' = 1.5"):  # the launcher refuses it before starting anything
        launch(ROOT, "tau=1.5", flwr_home=tmp_path / "flwr", extra_env=_env(tmp_path))
    assert not (tmp_path / "flwr").exists()
    # A plain `flwr run` has no launcher in front: the ServerApp refuses it and the run ends failed.
    status, record = launch(
        ROOT, "tau=1.5", num_supernodes=2, flwr_home=tmp_path / "flwr", timeout=180,
        log_file=tmp_path / "run.log", extra_env=_env(tmp_path), check_config=False,
    )
    assert status == "finished:failed", record
    log = (tmp_path / "run.log").read_text()
    assert "key 'tau' = 1.5" in log and "< 1.0" in log, log[-2000:]
    assert not list((tmp_path / "out").glob("*/results.json"))  # nothing written before validation


def test_two_launches_from_one_checkout_run_side_by_side(tmp_path):
    """Each launch has its own config file and SuperLink database: neither run gets the other's config."""
    from concurrent.futures import ThreadPoolExecutor

    env = _env(tmp_path)

    def run(tau: float) -> tuple[str, dict]:
        overrides = [f'tau={tau} run-name="tau{tau}" stages="fe" fedce-rounds=1 pooled-probe=false']
        return launch(ROOT, str(ROOT / "configs" / "smoke.toml"), flwr_home=tmp_path / "flwr", timeout=300,
                      extra_env=env, overrides=overrides)

    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(run, (0.1, 0.3)))
    assert [status for status, _ in outcomes] == ["finished:completed"] * 2, outcomes
    for tau in (0.1, 0.3):
        assert json.loads((tmp_path / "out" / f"tau{tau}" / "results.json").read_text())["config"]["tau"] == tau
    assert not any((tmp_path / "flwr" / "launches").iterdir())  # a completed launch removes its folder
    assert processes_mentioning(str(tmp_path)) == []


def test_no_process_left_behind(smoke_run):
    _, _, _, tmp = smoke_run
    assert processes_mentioning(str(tmp)) == []
    assert processes_mentioning((tmp / "ray-tmpdir").read_text()) == []


def test_fedsc_smoke_preset_completes_with_probe_nmoe_and_epsilon(tmp_path):
    out = tmp_path / "out"
    status, record = _launch_preset("fedsc-smoke", tmp_path)
    assert status == "finished:completed", (record, (tmp_path / "run.log").read_text()[-3000:])
    results = json.loads((out / "fedsc-smoke" / "results.json").read_text())
    fedsc = results["stages"]["fedsc"]
    assert 0 < fedsc["dp-epsilon-spent"] <= 8.0 * 1.01 and fedsc["noise-multiplier"] > 0
    assert fedsc["matrix-releases-per-client-max"] == 3
    assert set(results["results"]["extractor-knn"]["per-client"]) == {"0", "1", "2", "3"}
    assert results["results"]["nmoe"]["mean"]["accuracy"] > 0.5
    assert processes_mentioning(str(tmp_path)) == []
    assert processes_mentioning((tmp_path / "ray-tmpdir").read_text()) == []


def test_alignment_smoke_preset_writes_summary_csv_and_plots(tmp_path):
    out = tmp_path / "out"
    status, record = _launch_preset("alignment-smoke", tmp_path)
    assert status == "finished:completed", (record, (tmp_path / "run.log").read_text()[-3000:])
    folder = out / "alignment-smoke"
    summary = json.loads((folder / "results.json").read_text())["stages"]["alignment"]["summary"]
    assert summary["assignment"] == "load-balanced" and summary["capacities"] == [2, 2, 6, 6]
    counts = summary["assignment-counts"]
    assert [sum(row) for row in counts] == [5 * c for c in (2, 2, 6, 6)]  # capacity filled every round
    assert summary["bytes-total"] > 0 and summary["sim-seconds-total"] > 0
    saved = json.loads((folder / "results.json").read_text())
    by_round = saved["stages"]["alignment"]["rounds"]
    assert summary["final-accuracy"] == by_round["5"]["accuracy"]  # the last of moe-rounds = 5
    assert summary["best-accuracy"] == max(r["accuracy"] for r in by_round.values())
    assert saved["results"]["alignment-global-moe"]["mean"]["accuracy"] == summary["final-accuracy"]
    for png in ("assignment_heatmap.png", "accuracy.png"):
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [r for r in (folder / "rounds.csv").read_text().splitlines() if r.startswith("alignment,")]
    assert len(rows) == 5
    assert (folder / "extractor.pt").exists()
    assert processes_mentioning(str(tmp_path)) == []


def test_smoke_checkpoints_served_over_grpc_match_training_time_evaluation(smoke_run):
    """Three `nmoe serve-expert` processes + one `nmoe infer` on the smoke run's checkpoints."""
    _, _, folder, tmp = smoke_run
    ckpts = folder / "checkpoints"
    procs = []
    try:
        addresses = {}
        for pid in (1, 2, 3):
            proc = subprocess.Popen(
                [sys.executable, "-m", "nmoe_flwr.cli.inference", "serve-expert", "--checkpoint", str(ckpts / f"client-{pid}")],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            procs.append(proc)
            addresses[pid] = proc.stdout.readline().split()[-1]
        table = ",".join(f"{pid}={a}" for pid, a in addresses.items())

        def infer(out):
            subprocess.run(
                [sys.executable, "-m", "nmoe_flwr.cli.inference", "infer", "--checkpoint", str(ckpts / "client-0"),
                 "--neighbours", table, "--json", str(out), "--timeout", "5"],
                check=True, capture_output=True, timeout=120,
            )
            return json.loads(out.read_text())

        served = infer(tmp / "infer.json")
        trained = json.loads((folder / "results.json").read_text())["results"]["nmoe"]["per-client"]["0"]
        assert served["accuracy"] == pytest.approx(trained["accuracy"], abs=1e-12)
        assert served["macro-f1"] == pytest.approx(trained["macro-f1"], abs=1e-12)
        assert served["routed-to-neighbour"] == pytest.approx(trained["routed-to-neighbour"], abs=1e-12)
        assert served["rerouted"] == 0
        procs[0].kill()
        procs[0].wait(10)
        degraded = infer(tmp / "infer-degraded.json")
        assert degraded["samples"] == served["samples"]  # every sample classified with expert 1 down
        assert degraded["rerouted"] == served["samples-per-expert"]["1"]  # exactly those that wanted expert 1
        assert degraded["samples-per-expert"]["1"] == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)


def test_smoke_with_30_percent_drop_outs_completes_and_records_who_was_missing(tmp_path):
    """Issue 12.2: each round goes on with the clients that answered; a lost expert is left out of the bank."""
    from nmoe_flwr.faults import fault_of

    rate, seed = 0.3, 2  # seed 2: drop-outs in most rounds and one lost expert (partition 1)
    status, record = launch(
        ROOT, str(ROOT / "configs" / "smoke.toml"), flwr_home=tmp_path / "flwr", timeout=420,
        log_file=tmp_path / "run.log", extra_env=_env(tmp_path),
        overrides=[f"seed={seed} fault-drop-rate={rate} local-baseline=false centralized-baseline=false pooled-probe=false"],
    )
    assert status == "finished:completed", (record, (tmp_path / "run.log").read_text()[-3000:])
    results = json.loads((tmp_path / "out" / "smoke" / "results.json").read_text())

    def expected(stage: str, rounds: int) -> dict[str, list[str]]:
        lost = {str(r): sorted(str(p) for p in range(4) if fault_of(seed, p, stage, r, rate, 0.0) == "drop")
                for r in range(1, rounds + 1)}
        return {r: pids for r, pids in lost.items() if pids}

    for stage, rounds in (("fedce", 3), ("gate", 3)):
        recorded = {r: sorted(lost) for r, lost in results["stages"][stage]["missing-replies"].items()}
        assert recorded == expected(stage, rounds), stage
        assert all("injected drop-out" in why for lost in results["stages"][stage]["missing-replies"].values()
                   for why in lost.values())
    lost_experts = sorted(str(p) for p in range(4) if fault_of(seed, p, "expert", 0, rate, 0.0) == "drop")
    assert lost_experts == ["1"]
    assert sorted(results["stages"]["experts"]["missing"]) == lost_experts
    assert sorted(results["results"]["personalized-expert"]["per-client"]) == sorted(set("0123") - set(lost_experts))
    assert set(results["results"]["nmoe"]["per-client"]) == {"0", "1", "2", "3"}  # evaluation is never faulted
    assert results["results"]["nmoe"]["mean"]["accuracy"] > 0.3
    assert "reply of node" in (tmp_path / "run.log").read_text()  # the WARNING naming the node
    assert processes_mentioning(str(tmp_path)) == []


def test_a_run_killed_in_stage_1_resumes_and_ends_as_if_uninterrupted(smoke_run, tmp_path):
    """Issue 12.3: SIGKILL every process of a run after its first FedCE round; `nmoe-run --resume`
    continues from the checkpoint and ends with the results of the uninterrupted smoke run (up to float noise)."""
    import os
    import signal
    import time

    from nmoe_flwr.cli.run import resume_config

    env = {**os.environ, **_env(tmp_path)}
    cmd = [sys.executable, "-m", "nmoe_flwr.cli.run", "--app", str(ROOT), "--flwr-home", str(tmp_path / "flwr"),
           "--run-config", str(ROOT / "configs" / "smoke.toml")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = tmp_path / "out" / "smoke"
    checkpoint = folder / "resume" / "fedce.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert checkpoint.exists(), "no FedCE round was checkpointed"
    ray_tmp = (tmp_path / "ray-tmpdir").read_text()
    for line in processes_mentioning(str(tmp_path)) + processes_mentioning(ray_tmp):  # the crash
        os.kill(int(line.split(":")[0]), signal.SIGKILL)
    proc.wait(timeout=30)
    killed_after = torch.load(checkpoint, weights_only=True)["round"]
    assert killed_after < 3, "the run finished stage 1 before it could be killed"
    assert json.loads((folder / "results.json").read_text())["run"]["status"] == "running"

    config = resume_config(folder)
    assert config["resume"] is True and config["run-name"] == "smoke"
    status, record = launch(ROOT, config,  # the recorded config as nmoe-run --resume passes it
                            flwr_home=tmp_path / "flwr", timeout=420, log_file=tmp_path / "resume.log",
                            extra_env=_env(tmp_path))
    assert status == "finished:completed", (record, (tmp_path / "resume.log").read_text()[-3000:])
    assert f"resuming after round {killed_after} of 3" in (tmp_path / "resume.log").read_text()
    resumed = json.loads((folder / "results.json").read_text())
    _, _, smoke_folder, _ = smoke_run
    uninterrupted = json.loads((smoke_folder / "results.json").read_text())
    assert resumed["run"]["status"] == "completed" and resumed["run"]["resumed-runs"]
    assert set(resumed["results"]) == set(uninterrupted["results"])  # same results.json shape
    assert sorted(resumed["stages"]["fedce"]["rounds"]) == ["1", "2", "3"]
    # Bit for bit: replies are summed in partition order (not in node-id order, which Flower draws anew per
    # launch), so the killed-and-resumed run repeats the uninterrupted one exactly.
    old_rounds, new_rounds = uninterrupted["stages"]["fedce"]["rounds"], resumed["stages"]["fedce"]["rounds"]
    for r in ("1", "2", "3"):
        assert new_rounds[r]["train-loss"] == old_rounds[r]["train-loss"], r
    for method in ("fedce-classifier", "personalized-expert", "nmoe"):
        for key in ("accuracy", "macro-f1"):
            assert resumed["results"][method]["mean"][key] == uninterrupted["results"][method]["mean"][key], (method, key)
    assert processes_mentioning(str(tmp_path)) == []
