"""The plain FedCE reference (``nmoe_flwr.cli.plain_fedce.fedce_plain``, no Flower)
gives the same numbers as the Flower path: the real ``PartialFedAvg.start`` driving
the real ClientApp through an in-process Grid."""


import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from inprocess_grid import InProcessGrid

from nmoe_flwr import client_app
from nmoe_flwr.algorithms.fedce import new_classifier
from nmoe_flwr.algorithms.seeding import derive_seed
from nmoe_flwr.algorithms.training import mean_over_clients, resolve_runtime
from nmoe_flwr.cli.plain_fedce import fedce_plain, weighted_mean
from nmoe_flwr.config import parse_run_config
from nmoe_flwr.constants import (
    ACCURACY,
    ARRAYS,
    EXTRACTOR_PREFIX,
    HEAD_PREFIX,
    METRICS,
    MSG_EVAL_CLASSIFIER,
    MSG_EXPERT,
    MSG_FEDCE,
    MSG_INFO,
    NUM_ROUNDS,
    PARTITION_ID,
)
from nmoe_flwr.data import all_client_splits, dataset_spec
from nmoe_flwr.pipelines.messaging import weights_message
from nmoe_flwr.records import from_record, pack, to_record, unpack
from nmoe_flwr.strategies import PartialFedAvg
from nmoe_flwr.workspace import cache_dir

pytestmark = pytest.mark.usefixtures("task_identity")

ROUNDS = 2


@pytest.fixture
def run_config(tiny_run_config):
    return {**tiny_run_config, "run-name": "plain-vs-flwr", "fedce-rounds": ROUNDS}


def _flower_path(run_config):
    """Stage 1 as the ServerApp runs it (PartialFedAvg on packed weights, as Federation.partial_fedavg),
    then the FedCE classifier evaluation."""
    cfg = parse_run_config(run_config)
    grid = InProcessGrid(client_app.app, run_config, num_nodes=cfg.num_clients)
    prefixes = (EXTRACTOR_PREFIX, HEAD_PREFIX) if cfg.fedce_average_head else (EXTRACTOR_PREFIX,)
    stats = dataset_spec(cfg.dataset).pixel_stats
    init = new_classifier(stats, 10, cfg.mlp_hidden, derive_seed(cfg.seed, "fedce-init"))
    strategy = PartialFedAvg(
        prefixes, train_message_type=MSG_FEDCE, fraction_evaluate=0.0,
        min_train_nodes=cfg.num_clients, min_available_nodes=cfg.num_clients,
        server_momentum=cfg.fedce_server_momentum,
    )
    result = strategy.start(  # packed on the wire, as Federation.partial_fedavg sends it
        grid=grid, initial_arrays=to_record(pack(init.state_dict())), num_rounds=cfg.fedce_rounds,
        timeout=cfg.round_timeout, train_config=ConfigRecord({NUM_ROUNDS: cfg.fedce_rounds}),
    )
    assert sorted(result.train_metrics_clientapp) == list(range(1, cfg.fedce_rounds + 1))
    replies = grid.send_and_receive([
        Message(weights_message(result.arrays), dst_node_id=node, message_type=MSG_EVAL_CLASSIFIER)
        for node in grid.get_node_ids()
    ])
    per_client = {int(r.content[METRICS][PARTITION_ID]): dict(r.content[METRICS]) for r in replies}
    return unpack(from_record(result.arrays), init.state_dict()), per_client, grid


@pytest.mark.parametrize(("average_head", "momentum", "prox_mu"),
                         [(True, 0.0, 0.0), (False, 0.0, 0.0), (True, 0.7, 0.0), (False, 0.0, 1.0)])
def test_plain_fedce_matches_the_flower_path(run_config, average_head, momentum, prox_mu):
    """Final averaged weights (extractor, and head if averaged) and each client's FedCE-classifier
    test accuracy and macro-F1 are identical between fedce_plain and PartialFedAvg + ClientApp.

    Bit-exact here although Flower's FedAvg sums ``w_i * x_i`` in float32 (int64 BatchNorm
    counters become float64) and the plain path sums in float64 and casts back: with two
    clients of equal size both compute ``0.5 a + 0.5 b`` with a single rounding to float32.
    With unequal weights the two would differ in the last bits (then compare with atol ~1e-5).
    """
    rounds = 3 if momentum else ROUNDS  # FedAvgM first accelerates in round 3 (round 1 is plain, round 2 starts v)
    run_config = {**run_config, "fedce-average-head": average_head, "fedce-server-momentum": momentum,
                  "fedce-rounds": rounds, "fedce-prox-mu": prox_mu}
    cfg = parse_run_config(run_config)
    flwr_state, flwr_metrics, grid = _flower_path(run_config)

    splits = all_client_splits(cfg, cache_dir(cfg.output_dir))
    plain_state, plain_metrics = fedce_plain(cfg, splits, resolve_runtime(cfg.device, cfg.amp, cfg.channels_last))

    # Every client trained every round, then evaluated once.
    assert sorted(grid.delivered) == sorted([(n, MSG_FEDCE) for n in grid.node_ids] * rounds
                                            + [(n, MSG_EVAL_CLASSIFIER) for n in grid.node_ids])
    prefixes = (EXTRACTOR_PREFIX, HEAD_PREFIX) if average_head else (EXTRACTOR_PREFIX,)
    assert set(flwr_state) == {k for k in plain_state if k.startswith(prefixes)}
    assert any(k.startswith(HEAD_PREFIX) for k in flwr_state) == average_head
    initial = new_classifier(dataset_spec(cfg.dataset).pixel_stats, 10, cfg.mlp_hidden,
                             derive_seed(cfg.seed, "fedce-init")).state_dict()
    for key, value in flwr_state.items():
        plain = plain_state[key].double()
        assert torch.equal(value.double(), plain), (key, (value.double() - plain).abs().max())
        if key.endswith("num_batches_tracked"):
            assert plain.item() == rounds * 3  # 24 samples / batch 8 = 3 steps per round on both clients
    moved = max((plain_state[k].double() - initial[k].double()).abs().max().item() for k in flwr_state)
    assert moved > 1e-2  # the comparison is not between two untouched initialisations

    assert sorted(flwr_metrics) == [0, 1]
    for pid, plain in enumerate(plain_metrics):
        assert flwr_metrics[pid][ACCURACY] == pytest.approx(plain[ACCURACY], abs=1e-12), pid
        assert flwr_metrics[pid]["macro-f1"] == pytest.approx(plain["macro-f1"], abs=1e-12), pid
        assert flwr_metrics[pid]["num-examples"] == 20
    assert mean_over_clients(dict(enumerate(plain_metrics)))[ACCURACY] > 0.1  # above chance (10 classes)

    if prox_mu:  # both paths applied the proximal term: without it the weights differ
        no_prox = parse_run_config({**run_config, "fedce-prox-mu": 0.0})
        free_state, _ = fedce_plain(no_prox, splits, resolve_runtime(cfg.device, cfg.amp, cfg.channels_last))
        assert any(not torch.equal(free_state[k], plain_state[k]) for k in flwr_state)

    if not average_head:  # each client kept its own head in its Context between messages
        heads = [from_record(grid.contexts[n].state[client_app.LOCAL_FEDCE]) for n in grid.node_ids]
        assert not torch.equal(heads[0]["head.net.6.weight"], heads[1]["head.net.6.weight"])


def test_experts_start_from_the_heads_clients_kept_local_and_refuse_to_without_one(run_config):
    """``expert-init = 'head'`` with ``fedce-average-head = false``: the server sends only the extractor,
    so stage 2 must find the head each client kept after stage 1; a client that never ran stage 1
    has none and replies with an error instead of silently starting from scratch."""
    run_config = {**run_config, "fedce-average-head": False, "expert-init": "head"}
    state, _, grid = _flower_path(run_config)
    extractor = to_record({k: v for k, v in state.items() if k.startswith(EXTRACTOR_PREFIX)})
    replies = grid.send_and_receive([
        Message(weights_message(extractor), dst_node_id=node, message_type=MSG_EXPERT) for node in grid.node_ids
    ])
    assert len(replies) == 2 and not any(r.has_error() for r in replies)
    fresh = InProcessGrid(client_app.app, {**run_config, "run-name": "no-stage-1"}, num_nodes=2)
    replies = fresh.send_and_receive([
        Message(weights_message(extractor), dst_node_id=node, message_type=MSG_EXPERT) for node in fresh.node_ids
    ])
    assert len(replies) == 2 and all(r.has_error() and "no head" in r.error.reason for r in replies)


def test_weighted_mean_is_fedavg_by_example_count():
    """weighted_mean: sum_i w_i s_i / sum_i w_i per entry, computed in float64, dtype kept."""
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(2)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(6)}
    out = weighted_mean([a, b], [1, 3])
    assert out["w"].tolist() == [2.5, 5.0] and out["w"].dtype == torch.float32  # (1*[1, 2] + 3*[3, 6]) / 4
    assert out["n"].item() == 5 and out["n"].dtype == torch.int64  # (2 + 18) / 4


def test_in_process_grid_reports_a_raising_handler_as_an_error_reply(run_config):
    """A handler that raises becomes an error reply from that node, not an exception on the server."""
    grid = InProcessGrid(client_app.app, {**run_config, "tau": 5.0}, num_nodes=2)
    replies = list(grid.send_and_receive([Message(RecordDict(), dst_node_id=1002, message_type=MSG_INFO)]))
    assert len(replies) == 1 and replies[0].has_error()
    assert replies[0].metadata.src_node_id == 1002
    assert "key 'tau' = 5.0" in replies[0].error.reason
    ok = InProcessGrid(client_app.app, run_config, num_nodes=2)
    (reply,) = ok.send_and_receive([Message(RecordDict(), dst_node_id=1002, message_type=MSG_INFO)])
    assert not reply.has_error() and reply.metadata.src_node_id == 1002
    assert reply.content[METRICS][PARTITION_ID] == 1
    assert ARRAYS not in reply.content
