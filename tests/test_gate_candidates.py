"""Gate candidates (``gate-candidates = k``): which experts each client gets, and stages 2-3 with them."""

import json

import numpy as np
import pytest
import torch
from inprocess_grid import InProcessGrid

from nmoe_flwr import client_app
from nmoe_flwr.algorithms.candidates import choose_candidates, class_specialists
from nmoe_flwr.algorithms.fedce import new_classifier
from nmoe_flwr.algorithms.seeding import derive_seed
from nmoe_flwr.config import ConfigError, parse_run_config
from nmoe_flwr.constants import MSG_EVAL_NMOE
from nmoe_flwr.data import dataset_spec
from nmoe_flwr.pipelines.messaging import Federation, weights_message
from nmoe_flwr.pipelines.nmoe import train_experts, train_gates
from nmoe_flwr.pipelines.results import RunRecorder
from nmoe_flwr.records import to_record

# Four clients, two classes: 0 and 2 mostly hold class 0, 1 and 3 class 1.
SUPPORT = {0: np.array([9, 1]), 1: np.array([1, 9]), 2: np.array([8, 2]), 3: np.array([2, 8])}


def test_specialists_of_a_class_are_the_experts_with_the_largest_share_of_it():
    assert class_specialists(SUPPORT, pool=2) == [[0, 2], [1, 3]]
    assert class_specialists(SUPPORT, pool=1) == [[0], [1]]


def test_a_client_gets_its_own_expert_and_a_specialist_of_the_class_it_lacks():
    chosen = choose_candidates(SUPPORT, k=2, seed=0)
    for client, lacks in ((0, {1, 3}), (2, {1, 3}), (1, {0, 2}), (3, {0, 2})):
        own, = set(chosen[client]) - lacks
        assert own == client and len(chosen[client]) == 2 and set(chosen[client]) & lacks


def test_candidates_are_seeded_and_the_whole_bank_when_k_covers_it():
    assert choose_candidates(SUPPORT, 2, seed=3) == choose_candidates(SUPPORT, 2, seed=3)
    assert choose_candidates(SUPPORT, 4, seed=0) == {i: [0, 1, 2, 3] for i in SUPPORT}
    assert choose_candidates(SUPPORT, 9, seed=0) == {i: [0, 1, 2, 3] for i in SUPPORT}


def test_a_client_whose_expert_is_missing_gets_k_others():
    chosen = choose_candidates(SUPPORT, k=2, seed=0, experts=[0, 1, 2])
    assert 3 not in {j for c in chosen.values() for j in c}
    assert len(chosen[3]) == 2 and 3 not in chosen[3]


def test_with_dominant_class_clients_every_client_covers_every_class_and_the_load_is_spread():
    """100 clients, 10 classes, client i dominant in class i % 10; k = 11: own + one specialist per class."""
    support = {i: np.where(np.arange(10) == i % 10, 90, 1) for i in range(100)}
    chosen = choose_candidates(support, k=11, seed=0)
    for i, c in chosen.items():
        assert i in c and len(c) == 11
        assert {j % 10 for j in c} == set(range(10))  # a specialist (owner) of every class
    load = np.bincount([j for c in chosen.values() for j in c], minlength=100)
    assert load.sum() == 1100 and load.max() <= 3 * load.mean()  # no expert is everyone's candidate


def test_gate_candidates_below_top_k_is_refused():
    with pytest.raises(ConfigError, match="gate-candidates"):
        parse_run_config({"gate-candidates": 1})
    assert parse_run_config({"gate-candidates": 0}).gate_candidates == 0


@pytest.mark.usefixtures("task_identity")
def test_stages_2_and_3_with_candidates_and_half_the_clients_per_round(tiny_run_config, tmp_path):
    """10 clients, 3 candidates each, fraction-train 0.5: each client stores exactly its candidates (own
    included), its gate never routes elsewhere, and each gate round averages 5 clients."""
    run_config = {**tiny_run_config, "num-clients": 10, "gate-candidates": 3, "fraction-train": 0.5,
                  "gate-rounds": 2, "expert-epochs": 2, "test-per-client": 10}
    cfg = parse_run_config(run_config)
    grid = InProcessGrid(client_app.app, run_config, num_nodes=10)
    fed = Federation(grid, cfg, {node: i for i, node in enumerate(grid.get_node_ids())}, 1, 10)
    rec = RunRecorder(tmp_path / "run", cfg.to_dict(), run_id=1)
    init = new_classifier(dataset_spec(cfg.dataset).pixel_stats, 10, cfg.mlp_hidden, derive_seed(cfg.seed, "c"))
    bank, support = train_experts(fed, rec, to_record(init.state_dict()))
    assert sorted(bank) == list(range(10)) and all(support[i].sum() == cfg.train_per_client for i in range(10))
    gate = train_gates(fed, rec, bank, support)
    rec.save()
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    candidates = {int(p): c for p, c in results["stages"]["gate-candidates"]["per-client"].items()}
    assert all(len(c) == 3 and p in c for p, c in candidates.items())
    assert [r["replies"] for r in results["stages"]["gate"]["rounds"].values()] == [5, 5]
    for pid in range(10):
        stored = torch.load(tmp_path / "out" / "tiny" / "clients" / str(pid) / "bank.pt", weights_only=True)
        assert sorted(stored) == candidates[pid]
    metrics = fed.broadcast_metrics(weights_message(gate), MSG_EVAL_NMOE)
    assert len(metrics) == 10
    for pid in range(10):  # the inference checkpoint's gate masks every non-candidate
        saved = torch.load(tmp_path / "out" / "tiny" / "checkpoints" / f"client-{pid}" / "gate.pt", weights_only=True)
        reachable = torch.isfinite(saved["log_prior"]).nonzero().flatten().tolist()
        assert reachable == candidates[pid]


@pytest.mark.usefixtures("task_identity")
def test_a_bank_without_recorded_class_support_goes_whole_to_every_client(tiny_run_config, tmp_path):
    """``gate-candidates`` needs each expert's class support; a bank resumed from a run that did not record
    it cannot pick specialists, so every client gets the whole bank (and the run says so) instead of failing."""
    from nmoe_flwr.algorithms.experts import new_expert
    from nmoe_flwr.pipelines.nmoe import send_bank

    run_config = {**tiny_run_config, "num-clients": 4, "gate-candidates": 2}
    cfg = parse_run_config(run_config)
    grid = InProcessGrid(client_app.app, run_config, num_nodes=4)
    fed = Federation(grid, cfg, {node: i for i, node in enumerate(grid.get_node_ids())}, 1, 10)
    rec = RunRecorder(tmp_path / "run", cfg.to_dict(), run_id=1)
    bank = {j: new_expert(10, cfg.mlp_hidden, seed=j).state_dict() for j in range(4)}
    send_bank(fed, rec, bank, support={})
    rec.save()
    for pid in range(4):
        stored = torch.load(tmp_path / "out" / "tiny" / "clients" / str(pid) / "bank.pt", weights_only=True)
        assert sorted(stored) == [0, 1, 2, 3]
    assert "gate-candidates" not in json.loads((tmp_path / "run" / "results.json").read_text()).get("stages", {})
