"""Scores, the four assignment rules (by hand), load metrics and capacity profiles."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nmoe_flwr.algorithms.alignment import (
    AlignmentScores,
    assign,
    load_cap,
    load_cv,
    rounds_to_target,
)
from nmoe_flwr.capacity import TIERS, CapacityProfile, parse_tiers, round_seconds


def _scores(fitness, usage):
    s = AlignmentScores(len(fitness), len(fitness[0]))
    s.fitness, s.usage = np.array(fitness, dtype=float), np.array(usage, dtype=float)
    return s


def test_score_updates_by_hand():
    s = AlignmentScores(2, 3, beta=0.5, gamma=0.9, improvement_weight=1.0, delta=0.5)
    s.fitness[:] = 1.0
    s.update(
        assigned={0: [1]},
        routing_share={0: np.array([0.2, 0.6, 0.2])},
        improvement={0: {1: 0.1}},
        load=np.array([0.0, 30.0, 10.0]),
    )
    # (0, 1): 0.5 * 1 + 0.5 * (0.6 + 0.1) = 0.85; all other pairs decay to 0.9
    np.testing.assert_allclose(s.fitness, [[0.9, 0.85, 0.9], [0.9, 0.9, 0.9]])
    # usage: 0.5 * 0 + 0.5 * [0, 0.75, 0.25]
    np.testing.assert_allclose(s.usage, [0.0, 0.375, 0.125])


def test_greedy_takes_highest_fitness_load_balanced_penalises_usage():
    s = _scores([[0.9, 0.8, 0.1], [0.9, 0.7, 0.1]], [0.6, 0.0, 0.0])
    rng = np.random.default_rng(0)
    assert assign("greedy", [0, 1], {0: 1, 1: 1}, s, rng) == {0: [0], 1: [0]}
    # desirability: client 0: [0.3, 0.8, 0.1] -> 1; client 1: [0.3, 0.7, 0.1] -> 1
    assert assign("load-balanced", [0, 1], {0: 1, 1: 1}, s, rng) == {0: [1], 1: [1]}


def test_optimal_splits_clients_when_a_better_global_split_exists():
    # Both prefer expert 0; with a load cap of 1 the best total is 0 -> client 0 (0.9), 1 -> client 1 (0.8).
    s = _scores([[0.9, 0.2], [0.85, 0.8]], [0.0, 0.0])
    got = assign("optimal", [0, 1], {0: 1, 1: 1}, s, np.random.default_rng(0))
    assert got == {0: [0], 1: [1]}
    assert assign("load-balanced", [0, 1], {0: 1, 1: 1}, s, np.random.default_rng(0)) == {0: [0], 1: [0]}


def test_random_respects_capacity_and_is_seeded():
    s = AlignmentScores(3, 8)
    a = assign("random", [0, 1, 2], {0: 2, 1: 4, 2: 20}, s, np.random.default_rng(1))
    assert [len(a[c]) for c in (0, 1, 2)] == [2, 4, 8]
    assert a == assign("random", [0, 1, 2], {0: 2, 1: 4, 2: 20}, s, np.random.default_rng(1))


def test_unknown_rule_is_rejected():
    with pytest.raises(ValueError, match="load-balanced"):
        assign("best", [0], {0: 1}, AlignmentScores(1, 2), np.random.default_rng(0))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 6).flatmap(lambda n: st.tuples(
        st.just(n), st.integers(2, 8),
        st.lists(st.integers(1, 8), min_size=n, max_size=n),
        st.integers(0, 2**31 - 1),
        st.floats(1.0, 2.0),
    ))
)
def test_optimal_never_violates_capacity_or_load_cap(args):
    n, e, caps, seed, slack = args
    rng = np.random.default_rng(seed)
    s = AlignmentScores(n, e)
    s.fitness, s.usage = rng.random((n, e)), rng.random(e)
    capacities = dict(enumerate(caps))
    got = assign("optimal", list(range(n)), capacities, s, rng, cap_slack=slack)
    cap = load_cap([min(c, e) for c in caps], e, slack)
    for i in range(n):
        assert len(got[i]) == min(caps[i], e) and len(set(got[i])) == len(got[i])
    counts = np.bincount([j for v in got.values() for j in v], minlength=e)
    assert counts.max() <= cap


def test_load_cv_and_rounds_to_target():
    assert load_cv(np.array([5.0, 5.0, 5.0])) == 0.0
    assert load_cv(np.array([0.0, 10.0])) == pytest.approx(1.0)
    assert rounds_to_target({1: 0.2, 2: 0.5, 3: 0.4, 4: 0.7}, 0.5) == 2
    assert rounds_to_target({1: 0.2}, 0.5) is None


def test_tiers_parse_and_round_time_by_hand():
    profiles = parse_tiers("jetson-nano:1, laptop:2", 3)
    assert profiles == [TIERS["jetson-nano"], TIERS["laptop"], TIERS["laptop"]]
    with pytest.raises(ValueError, match="unknown tier 'pi'"):
        parse_tiers("pi:3", 3)
    with pytest.raises(ValueError, match="describes 2 clients but num-clients = 3"):
        parse_tiers("laptop:2", 3)
    p = CapacityProfile(speed=0.5, max_experts=2, bandwidth_mbps=8, latency_ms=100)
    # down: 0.1 + 8 * 1e6 / 8e6 = 1.1 s; compute 2 / 0.5 = 4 s; up: 0.1 + 0.5 = 0.6 s
    assert round_seconds({0: p}, {0: 1_000_000}, {0: 500_000}, {0: 2.0}) == pytest.approx(5.7)
