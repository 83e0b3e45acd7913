"""nmoe-reproduce: reuse of finished runs, mean ± std over seeds, the tau table and plots."""

import json
from pathlib import Path

import pytest

from nmoe_flwr.cli.reproduce import (
    completed,
    fmt,
    resumable,
    run_name,
    seeds_table,
    summarize,
    tau_table,
)
from nmoe_flwr.pipelines.plots import metric_vs_tau


def _results(acc: float, f1: float, routed: float | None = None) -> dict:
    nmoe = {"accuracy": acc, "macro-f1": f1, "iid-accuracy": acc - 0.2, "iid-macro-f1": f1 - 0.1}
    if routed is not None:
        nmoe["routed-to-neighbour"] = routed
    return {"nmoe": {"mean": nmoe}, "personalized-expert": {"mean": {"accuracy": acc - 0.01, "macro-f1": f1 - 0.1}}}


def test_fmt_is_mean_and_sample_std():
    assert fmt([0.5, 0.7]) == "0.600 ± 0.141"  # sample std of (0.5, 0.7) = 0.1 * sqrt(2)
    assert fmt([0.5]) == "0.500"
    assert fmt([]) == "-"


def test_summarize_collects_run_means_per_method_and_metric():
    summary = summarize([_results(0.9, 0.6, 0.1), _results(0.95, 0.7, 0.3), {"nmoe": {"mean": {"accuracy": 0.8}}}])
    assert summary["nmoe"]["accuracy"] == [0.9, 0.95, 0.8]
    assert summary["nmoe"]["macro-f1"] == [0.6, 0.7]  # the third run has no macro-F1: left out, not zero
    assert summary["nmoe"]["routed-to-neighbour"] == [0.1, 0.3]
    assert "routed-to-neighbour" not in summary["personalized-expert"]
    assert list(summary) == ["nmoe", "personalized-expert"]  # METHODS order


def test_seeds_table_rows():
    md = seeds_table(summarize([_results(0.9, 0.6, 0.1), _results(0.95, 0.7, 0.3)]))
    nmoe = next(line for line in md.splitlines() if line.startswith("| NMoE"))
    assert "0.925 ± 0.035" in nmoe and "0.650 ± 0.071" in nmoe and nmoe.endswith("| 2 |")
    expert = next(line for line in md.splitlines() if line.startswith("| personalized expert"))
    assert expert.count("| - ") == 3  # IID columns and routed share: not reported by that run


def test_tau_table_has_a_column_per_tau():
    md = tau_table({0.1: summarize([_results(0.9, 0.6)]), 0.5: summarize([_results(0.8, 0.75)])})
    assert md.splitlines()[0] == "| method | tau = 0.1 | tau = 0.5 |"
    assert "| 0.600 | 0.750 |" in md
    routed = tau_table({0.1: summarize([_results(0.9, 0.6, 0.1)]), 0.5: summarize([_results(0.8, 0.75, 0.4)])},
                       "routed-to-neighbour")
    assert routed.splitlines()[2:] == ["| NMoE (top-k over all experts) | 0.100 | 0.400 |"]  # no all-"-" rows


def test_completed_needs_status_seed_and_tau(tmp_path: Path):
    path = tmp_path / "results.json"
    assert not completed(path, 0, 0.1)
    path.write_text(json.dumps({"run": {"status": "completed"}, "config": {"seed": 0, "tau": 0.1}}))
    assert completed(path, 0, 0.1)
    assert not completed(path, 1, 0.1) and not completed(path, 0, 0.3)
    path.write_text(json.dumps({"run": {"status": "failed"}, "config": {"seed": 0, "tau": 0.1}}))
    assert not completed(path, 0, 0.1)
    assert run_name("reproduce", 2, 0.3) == "reproduce-s2-tau0.3"


def test_resumable_only_for_an_unfinished_run_of_the_same_config_with_checkpoints(tmp_path: Path):
    run = tmp_path / "rep-s0-tau0.1"
    run.mkdir()
    config = {"seed": 0, "tau": 0.1, "run-name": run.name, "output-dir": "", "dp-epsilon": "inf", "fedce-rounds": 50}
    expected = {"seed": 0, "tau": 0.1, "run-name": run.name, "dp-epsilon": float("inf"), "fedce-rounds": 50}

    def record(status: str, **changes) -> None:
        (run / "results.json").write_text(json.dumps({"run": {"status": status}, "config": {**config, **changes}}))

    record("running")
    assert resumable(run, expected) is None  # no checkpoint yet: nothing to resume from
    (run / "resume").mkdir()
    (run / "resume" / "fedce.pt").write_bytes(b"round 2")
    resume = resumable(run, expected)
    assert resume is not None and resume["resume"] is True and resume["dp-epsilon"] == float("inf")
    assert resume["output-dir"] == str(tmp_path.resolve()) and resume["run-name"] == run.name
    assert resumable(run, {**expected, "tau": 0.3}) is None  # another config: started afresh
    assert resumable(run, {**expected, "fedce-rounds": 30}) is None
    record("completed")
    assert resumable(run, expected) is None  # finished: reused, not resumed


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_metric_vs_tau_writes_a_png(tmp_path: Path):
    by_tau = {t: summarize([_results(0.9, f1, 0.2)]) for t, f1 in ((0.1, 0.6), (0.3, 0.7), (0.5, 0.8))}
    out = metric_vs_tau(by_tau, "macro-f1", "macro-F1", tmp_path / "f1.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tables_only_summarizes_finished_runs(tmp_path: Path, capsys):
    from nmoe_flwr.cli.reproduce import main

    def finished(seed: int, tau: float, f1: float) -> None:
        folder = tmp_path / run_name("rep", seed, tau)
        folder.mkdir()
        probe = {"knn-pooled-accuracy": f1 + 0.1, "linear-pooled-accuracy": f1 + 0.2, "mlp-pooled-accuracy": f1 + 0.3}
        stages = {"pooled-probe": {"train-samples": 10, "raw-pixels": probe, "extractor": probe}}
        data = {"run": {"status": "completed"}, "config": {"seed": seed, "tau": tau}, "results": _results(0.9, f1, tau),
                "stages": stages}
        (folder / "results.json").write_text(json.dumps(data))

    finished(0, 0.1, 0.6)
    finished(1, 0.1, 0.7)
    finished(0, 0.5, 0.8)  # seed 2 and tau 0.3 never finished: left out, said so
    code = main(["--run-config", "configs/smoke.toml", "--set", f'output-dir="{tmp_path}"', "--name", "rep",
                 "--seeds", "0,1,2", "--taus", "0.1,0.3,0.5", "--tables-only"])
    assert code == 0
    out = capsys.readouterr().out
    assert "rep-s2-tau0.1: not finished, left out" in out and "rep-s0-tau0.1: finished earlier, reused" in out
    summary = tmp_path / "rep"
    seeds_md = (summary / "seeds.md").read_text()
    assert "0.650 ± 0.071" in seeds_md
    # Probes over the same two seeds (0.6 and 0.7 + 0.3 for MLP); the random-init row was never recorded.
    assert "| stage-1 extractor | 0.750 ± 0.071 | 0.850 ± 0.071 | 0.950 ± 0.071 | 2 |" in seeds_md
    assert "| raw pixels (floor) |" in seeds_md and "random-init" not in seeds_md
    assert "| tau = 0.1 | tau = 0.5 |" in (summary / "tau.md").read_text()
    saved = json.loads((summary / "reproduce.json").read_text())
    assert saved["seeds"]["nmoe"]["macro-f1"] == [0.6, 0.7]
    assert saved["probes"]["extractor"]["knn-pooled-accuracy"] == pytest.approx([0.7, 0.8])
    assert (summary / "macro_f1_vs_tau.png").is_file() and (summary / "routed_vs_tau.png").is_file()


@pytest.mark.parametrize(("override", "message"), [
    ("fedce-round=5", "unknown key 'fedce-round'"),
    ("run-name=x", 'cannot parse "run-name=x"'),  # an unquoted string: named, not a traceback
])
def test_a_bad_override_stops_the_reproduction_before_any_run(capsys, override, message):
    from nmoe_flwr.cli.reproduce import main

    with pytest.raises(SystemExit) as exc:
        main(["--run-config", "configs/smoke.toml", "--set", override])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("nmoe-reproduce: ") and message in err


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_no_tau_table_without_a_finished_run_of_the_tau_seed(tmp_path: Path, capsys):
    """``--seeds 2 --taus ''`` (tau seed 0 not run): seeds.md only, no empty tau tables."""
    from nmoe_flwr.cli.reproduce import main

    folder = tmp_path / run_name("rep", 2, 0.1)
    folder.mkdir()
    folder.joinpath("results.json").write_text(json.dumps(
        {"run": {"status": "completed"}, "config": {"seed": 2, "tau": 0.1}, "results": _results(0.9, 0.6, 0.1)}))
    code = main(["--run-config", "configs/smoke.toml", "--set", f'output-dir="{tmp_path}"', "--name", "rep",
                 "--seeds", "2", "--taus", "", "--tables-only"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| method |  |" not in out and "Wrote seeds.md, reproduce.json in" in out
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == ["reproduce.json", "seeds.md"]


def test_a_name_that_is_a_run_folder_is_refused_before_anything_is_written(tmp_path: Path, capsys):
    """``--name`` names the summary folder; pointing it at a run's folder would mix tables into that run."""
    from nmoe_flwr.cli.reproduce import main

    run = tmp_path / "paper-run"
    run.mkdir()
    (run / "results.json").write_text("{}")
    code = main(["--run-config", "configs/smoke.toml", "--set", f'output-dir="{tmp_path}"', "--name", "paper-run",
                 "--tables-only"])
    assert code == 2 and "is a run folder" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["results.json"]


def _finished(root: Path, name: str, seed: int, tau: float, f1: float) -> Path:
    folder = root / run_name(name, seed, tau)
    folder.mkdir()
    folder.joinpath("results.json").write_text(json.dumps(
        {"run": {"status": "completed"}, "config": {"seed": seed, "tau": tau}, "results": _results(0.9, f1, tau)}))
    return folder


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_tau_tables_gather_every_finished_run_of_the_tau_seed(tmp_path: Path, capsys):
    """A tau sweep gathered by an earlier invocation (--taus 0.3) stays in tau.md and reproduce.json
    when this one asks for --taus ''; a folder that only looks like a run of the sweep is ignored."""
    from nmoe_flwr.cli.reproduce import finished_tau_runs, main

    _finished(tmp_path, "rep", 0, 0.1, 0.6)
    _finished(tmp_path, "rep", 0, 0.3, 0.7)
    _finished(tmp_path, "rep", 1, 0.5, 0.8)  # another seed: not the tau seed
    (tmp_path / "rep-s0-tau0.5-old").mkdir()
    (tmp_path / "rep-s0-tau0.9").mkdir()  # not finished
    assert list(finished_tau_runs(tmp_path, "rep", 0)) == [0.1, 0.3]
    code = main(["--run-config", "configs/smoke.toml", "--set", f'output-dir="{tmp_path}"', "--name", "rep",
                 "--seeds", "0", "--taus", "", "--tables-only"])
    assert code == 0
    summary = tmp_path / "rep"
    assert "| method | tau = 0.1 | tau = 0.3 |" in (summary / "tau.md").read_text()
    assert sorted(json.loads((summary / "reproduce.json").read_text())["by-tau"]) == ["0.1", "0.3"]
    assert (summary / "macro_f1_vs_tau.png").is_file()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tau_files_without_runs_behind_them_are_removed(tmp_path: Path, capsys):
    """tau.md and the plots of an earlier invocation whose runs were deleted would contradict
    reproduce.json's empty by-tau: they go, and the last line says so."""
    from nmoe_flwr.cli.reproduce import main

    _finished(tmp_path, "rep", 2, 0.1, 0.6)
    summary = tmp_path / "rep"
    summary.mkdir()
    for stale in ("tau.md", "macro_f1_vs_tau.png", "routed_vs_tau.png"):
        (summary / stale).write_text("from an earlier invocation")
    code = main(["--run-config", "configs/smoke.toml", "--set", f'output-dir="{tmp_path}"', "--name", "rep",
                 "--seeds", "2", "--taus", "", "--tables-only"])
    assert code == 0
    assert "removed tau.md, macro_f1_vs_tau.png, routed_vs_tau.png" in capsys.readouterr().out
    assert sorted(p.name for p in summary.iterdir()) == ["reproduce.json", "seeds.md"]
