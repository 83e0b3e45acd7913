"""RunRecorder: atomic results.json, strict JSON for non-finite floats, rounds.csv,
the closing table and timed steps."""

import csv
import json
import math
import re
import time

import pytest

from nmoe_flwr.pipelines import results
from nmoe_flwr.pipelines.results import RunRecorder, jsonable

TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d$")


def _strict_loads(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity (Python accepts them by default)."""

    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def _recorder(tmp_path, **config) -> RunRecorder:
    return RunRecorder(tmp_path / "my-run", {"seed": 3, **config}, run_id=42)


def test_strict_loads_helper_rejects_nan():
    """The strict parser used below really rejects what json.dumps writes for NaN."""
    with pytest.raises(ValueError, match="non-strict JSON constant NaN"):
        _strict_loads(json.dumps({"x": math.nan}))


def test_save_writes_results_json_and_leaves_no_temp_file(tmp_path):
    """save() writes results.json with the run's sections and removes its temp file."""
    rec = _recorder(tmp_path)
    rec.result("nmoe", {1: {"accuracy": 0.5}, 0: {"accuracy": 0.25}}, {"accuracy": 0.375})
    path = rec.save()
    assert path == tmp_path / "my-run" / "results.json"
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]  # no .json.tmp, no rounds.csv
    data = _strict_loads(path.read_text())
    assert list(data) == ["run", "config", "timings-s", "stages", "results"]
    assert data["run"]["run-id"] == 42 and data["run"]["name"] == "my-run"
    assert data["run"]["status"] == "running" and "finished" not in data["run"]
    assert TIME_RE.match(data["run"]["started"])
    assert data["config"] == {"seed": 3}
    # per-client keys become strings, sorted by client id
    assert list(data["results"]["nmoe"]["per-client"]) == ["0", "1"]
    assert data["results"]["nmoe"]["mean"] == {"accuracy": 0.375}


def test_save_with_status_sets_status_and_finished_time(tmp_path):
    """save("failed") records the status and a finished time stamp."""
    rec = _recorder(tmp_path)
    rec.save()
    data = _strict_loads(rec.save("failed").read_text())
    assert data["run"]["status"] == "failed"
    assert TIME_RE.match(data["run"]["finished"])
    assert data["run"]["finished"] >= data["run"]["started"]  # ISO strings sort by time


def test_failed_rename_keeps_the_previous_results_json(tmp_path, monkeypatch):
    """If the rename of the temp file fails, the previous results.json is intact and valid."""
    rec = _recorder(tmp_path)
    rec.note("stage", "one")
    path = rec.save()
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(results.os, "replace", broken_replace)  # results.os is the os module
    rec.note("stage", "two")
    with pytest.raises(OSError, match="disk gone"):
        rec.save("completed")
    assert path.read_bytes() == before
    assert _strict_loads(path.read_text())["run"]["stage"] == "one"

    monkeypatch.undo()  # the rename works again: the next save goes through
    data = _strict_loads(rec.save("completed").read_text())
    assert (data["run"]["stage"], data["run"]["status"]) == ("two", "completed")
    assert not (path.parent / "results.json.tmp").exists()


def test_jsonable_replaces_non_finite_floats_everywhere():
    """inf, -inf and nan become strings at any depth; finite values and other types are untouched."""
    value = {
        "a": math.inf, "b": [1.5, -math.inf, {"c": math.nan}], "d": (math.nan, 2), "e": "inf", "f": 7, "g": None,
    }
    assert jsonable(value) == {
        "a": "inf", "b": [1.5, "-inf", {"c": "nan"}], "d": ["nan", 2], "e": "inf", "f": 7, "g": None,
    }


def test_results_json_is_strict_json_with_non_finite_values(tmp_path):
    """Non-finite floats nested in stages/results/config are written as strings; the file is strict JSON."""
    rec = _recorder(tmp_path, **{"dp-epsilon": math.inf})
    rec.stage_details("fedsc", {"dp-epsilon-spent": math.inf, "rounds": {1: {"loss": math.nan}}, "list": [-math.inf, 1.0]})
    rec.result("alignment-global-moe", {}, {"accuracy": math.nan, "macro-f1": 0.5})
    data = _strict_loads(rec.save().read_text())
    assert data["config"]["dp-epsilon"] == "inf"
    assert data["stages"]["fedsc"] == {"dp-epsilon-spent": "inf", "rounds": {"1": {"loss": "nan"}}, "list": ["-inf", 1.0]}
    assert data["results"]["alignment-global-moe"]["mean"] == {"accuracy": "nan", "macro-f1": 0.5}
    # the recorder's own data is not modified by saving
    assert math.isinf(rec.data["stages"]["fedsc"]["dp-epsilon-spent"])


def test_rounds_csv_has_union_header_and_one_row_per_round_in_order(tmp_path):
    """rounds.csv: header = union of keys in first-seen order; rows per stage sorted by round, stages in call order."""
    rec = _recorder(tmp_path)
    rec.add_rounds("fedce", {2: {"train-loss": 0.5}, 1: {"train-loss": 1.0}})
    rec.add_rounds("gate", {1: {"train-loss": 0.25, "train-acc": 0.75}})
    rec.save()
    with (tmp_path / "my-run" / "rounds.csv").open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows == [
        ["stage", "round", "train-loss", "train-acc"],
        ["fedce", "1", "1.0", ""],
        ["fedce", "2", "0.5", ""],
        ["gate", "1", "0.25", "0.75"],
    ]
    assert not (tmp_path / "my-run" / "rounds.csv.tmp").exists()


def test_table_lists_present_methods_with_their_numbers(tmp_path):
    """table(): one row per recorded method (in METHODS order), accuracy/F1 to 4 places, routed share if any."""
    rec = _recorder(tmp_path)
    rec.result("fedce-classifier", {}, {"accuracy": 0.5, "macro-f1": 0.25})
    rec.result("nmoe", {}, {"accuracy": 0.875, "macro-f1": 0.8125, "iid-accuracy": 0.75, "iid-macro-f1": 0.625,
                            "routed-to-neighbour": 0.125})
    rec.result("not-a-known-method", {}, {"accuracy": 0.1, "macro-f1": 0.1})
    lines = rec.table().splitlines()
    assert lines[0].split() == ["method", "accuracy", "macro-F1", "iid", "acc", "iid", "F1", "routed"]
    assert lines[1] == "-" * len(lines[0])
    assert len(lines) == 4
    assert lines[2].startswith("NMoE (top-k over all experts)")
    assert lines[2].split()[-5:] == ["0.8750", "0.8125", "0.7500", "0.6250", "0.125"]
    assert lines[3].startswith("FedCE end-to-end classifier")
    assert lines[3].split()[-2:] == ["0.5000", "0.2500"]  # no routed column for a classifier
    assert "local classifier" not in rec.table()


def test_timed_returns_the_value_and_records_the_duration(tmp_path):
    """timed() returns fn's value and records its wall time (rounded to ms) under the step's name."""
    rec = _recorder(tmp_path)
    calls = []

    def step():
        calls.append(1)
        time.sleep(0.05)
        return {"answer": 42}

    assert rec.timed("stage1", step) == {"answer": 42}
    assert calls == [1]
    seconds = rec.data["timings-s"]["stage1"]
    assert 0.05 <= seconds < 2.0
    assert seconds == round(seconds, 3)
    rec.timing("manual", 1.23456)
    assert rec.data["timings-s"]["manual"] == 1.235


def test_a_new_run_under_an_old_name_never_leaves_completed(tmp_path):
    """Issue 12: opening a run folder replaces the earlier run's status at once; a refused config says failed."""
    old = RunRecorder(tmp_path / "same", {"seed": 0}, run_id=1)
    old.add_rounds("fedce", {1: {"loss": 1.0}})
    old.save("completed")
    assert (tmp_path / "same" / "rounds.csv").exists()
    RunRecorder(tmp_path / "same", {"seed": 0}, run_id=2)
    data = json.loads((tmp_path / "same" / "results.json").read_text())
    assert data["run"]["status"] == "running" and data["run"]["run-id"] == 2
    assert not (tmp_path / "same" / "rounds.csv").exists()
    RunRecorder.config_failure(tmp_path / "same", {"lr": float("inf")}, 3, ValueError("bad lr"))
    data = json.loads((tmp_path / "same" / "results.json").read_text())
    assert data["run"]["status"] == "failed" and data["run"]["error"] == "ValueError: bad lr"
    assert data["config"] == {"lr": "inf"}


def test_server_app_marks_a_refused_run_failed(tmp_path):
    from types import SimpleNamespace

    from nmoe_flwr.config import ConfigError, parse_run_config
    from nmoe_flwr.server_app import _record_config_failure

    raw = {"run-name": "again", "output-dir": str(tmp_path), "fedce-round": 5}
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "results.json").write_text(json.dumps({"run": {"status": "completed"}}))
    with pytest.raises(ConfigError) as info:
        parse_run_config(raw)
    _record_config_failure(SimpleNamespace(run_config=raw, run_id=7), info.value)
    data = json.loads((tmp_path / "again" / "results.json").read_text())
    assert data["run"]["status"] == "failed" and "unknown key 'fedce-round'" in data["run"]["error"]
    # A run name that is not a plain name is never used as a path, not even to record the failure.
    _record_config_failure(SimpleNamespace(run_config={**raw, "run-name": "../x"}, run_id=8), info.value)
    assert not (tmp_path.parent / "x").exists()
