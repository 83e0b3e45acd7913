"""nmoe-compare-alignment's sweep: the rows it runs, the seed table by hand, reuse of finished runs."""

import json

import pytest

from nmoe_flwr.cli.compare_alignment import (
    finished,
    main,
    mean_curve,
    seeds_table,
    variants,
)


def _summary(final, best, rounds, sim_target, sim_total, cv):
    return {"final-accuracy": final, "best-accuracy": best, "rounds-to-target": rounds,
            "sim-seconds-to-target": sim_target, "sim-seconds-total": sim_total, "load-cv": cv}


def test_variants_sweep_the_slack_of_optimal_only():
    rows = variants(["random", "optimal"], [1.0, 1.5, 2.0])
    assert rows == {"random": ("random", 1.0), "optimal": ("optimal", 1.0),
                    "optimal-slack1.5": ("optimal", 1.5), "optimal-slack2": ("optimal", 2.0)}
    assert variants(["greedy"], [1.5]) == {"greedy": ("greedy", 1.0)}  # no optimal, no slack rows


def test_seeds_table_by_hand():
    runs = {"greedy": [_summary(0.5, 0.6, 10, 5.0, 20.0, 0.2), _summary(0.7, 0.8, None, None, 22.0, 0.4)]}
    row = seeds_table(runs).splitlines()[2]
    # final 0.6 ± 0.141, best 0.7 ± 0.141, 1 of 2 seeds reached the target (in 10 rounds, 5 s), total 21 ± 1.414
    assert row == "| greedy | 0.600 ± 0.141 | 0.700 ± 0.141 | 1/2 | 10.000 | 5.000 | 21.000 ± 1.414 | 0.300 ± 0.141 | 2 |"


def test_mean_curve_averages_the_runs_of_each_round():
    assert mean_curve([{1: 0.2, 2: 0.4}, {1: 0.4}]) == {1: pytest.approx(0.3), 2: pytest.approx(0.4)}


def test_a_finished_run_is_reused_only_for_the_same_seed_rule_and_slack(tmp_path):
    path = tmp_path / "results.json"
    assert not finished(path, 0, "optimal", 1.0)
    path.write_text(json.dumps({"run": {"status": "completed"},
                                "config": {"seed": 0, "assignment": "optimal", "load-cap-slack": 1.5}}))
    assert finished(path, 0, "optimal", 1.5)
    assert not finished(path, 1, "optimal", 1.5) and not finished(path, 0, "optimal", 1.0)
    assert not finished(path, 0, "greedy", 1.5)


def test_bad_rule_or_slack_fails_before_any_run(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--rules", "random,fastest"])
    assert exc.value.code == 2 and "fastest" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--slacks", "0.5"])


def test_a_bad_override_fails_before_any_run(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--set", 'assignment="fastest"'])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("nmoe-compare-alignment: ")
    assert "'assignment'" in err and "fastest" in err and "'load-balanced'" in err  # key, value, what is allowed
