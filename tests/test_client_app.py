"""ClientApp handlers called directly (no Flower runtime): node-config checks,
and one FedCE round + NMoE stages on a tiny synthetic data set."""

import math

import pytest
import torch
from conftest import write_learnable_fmnist
from flwr.app import ConfigRecord, Context, Message, RecordDict

from nmoe_flwr import client_app
from nmoe_flwr.algorithms.fedce import new_classifier
from nmoe_flwr.algorithms.fedsc import new_ssl_model
from nmoe_flwr.algorithms.gate import new_gate
from nmoe_flwr.algorithms.seeding import derive_seed
from nmoe_flwr.client_app import ClientEnv
from nmoe_flwr.config import parse_run_config
from nmoe_flwr.constants import (
    ARRAYS,
    CONFIG,
    EXPERT_BANK,
    METRICS,
    NUM_ROUNDS,
    SERVER_ROUND,
    SHARED_PREFIXES,
)
from nmoe_flwr.data import dataset_spec
from nmoe_flwr.records import bank_to_record, from_record, to_record

pytestmark = pytest.mark.usefixtures("task_identity")

FMNIST_STATS = dataset_spec("fashion-mnist").pixel_stats


@pytest.fixture
def run_config(tmp_path):
    data = write_learnable_fmnist(tmp_path / "fmnist")
    return {
        "data-dir": str(data), "output-dir": str(tmp_path / "out"), "run-name": "unit",
        "num-clients": 2, "train-per-client": 40, "test-per-client": 20, "batch-size": 16,
        "mlp-hidden": 16, "expert-epochs": 2, "gate-local-epochs": 1,
    }


def _context(run_config, node_config):
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config)


def _msg(content, message_type):
    return Message(content, dst_node_id=1, message_type=message_type)


def test_missing_node_config_key_is_named(run_config):
    with pytest.raises(ValueError, match=r"node_config lacks partition-id;"):
        ClientEnv.of(_context(run_config, {"num-partitions": 2}))


def test_node_config_data_and_output_dirs_override_the_run_config(run_config, tmp_path):
    env = ClientEnv.of(_context(run_config, {
        "partition-id": 0, "num-partitions": 2, "data-dir": run_config["data-dir"], "output-dir": str(tmp_path / "node0"),
    }))
    assert env.cfg.output_dir == str(tmp_path / "node0")
    assert env.store.folder == tmp_path / "node0" / "unit" / "clients" / "0"
    assert len(env.splits().train) == 40


def test_num_partitions_must_match_num_clients(run_config):
    with pytest.raises(ValueError, match="num-clients=2"):
        ClientEnv.of(_context(run_config, {"partition-id": 0, "num-partitions": 3}))


@pytest.mark.parametrize("stay_margin", [0.0, 0.99])
def test_client_stages_in_process(run_config, stay_margin):
    run_config = {**run_config, "gate-stay-margin": stay_margin}
    ctx = _context(run_config, {"partition-id": 1, "num-partitions": 2})
    info = client_app.info(_msg(RecordDict(), "query.info"), ctx).content[METRICS]
    assert (info["partition-id"], info["num-train"], info["num-test"], info["in-channels"]) == (1, 40, 20, 1)

    cfg = parse_run_config(run_config)
    init = new_classifier(FMNIST_STATS, 10, cfg.mlp_hidden, derive_seed(cfg.seed, "fedce-init")).state_dict()
    shared = {k: v for k, v in init.items() if k.startswith("extractor.")}
    config = ConfigRecord({SERVER_ROUND: 1, NUM_ROUNDS: 2, SHARED_PREFIXES: ["extractor."]})
    reply = client_app.train_fedce(_msg(RecordDict({ARRAYS: to_record(shared), CONFIG: config}), "train.fedce"), ctx)
    sent = from_record(reply.content[ARRAYS])
    assert set(sent) == set(shared)  # the local head never leaves the client
    assert reply.content[METRICS]["num-examples"] == 40
    assert any(k.startswith("head.") for k in ctx.state[client_app.LOCAL_FEDCE])

    reply = client_app.train_expert(_msg(RecordDict({ARRAYS: reply.content[ARRAYS], CONFIG: ConfigRecord()}), "train.expert"), ctx)
    expert = from_record(reply.content[ARRAYS])
    expert_accuracy = reply.content[METRICS]["expert-accuracy"]
    client_app.store_expert_bank(_msg(RecordDict({EXPERT_BANK: bank_to_record({0: expert, 1: expert})}), "query.expert_bank"), ctx)

    gate_shared = {k: v for k, v in new_gate(cfg.mlp_hidden, cfg.num_clients, 0).state_dict().items() if k.startswith("shared.")}
    config = ConfigRecord({SERVER_ROUND: 1, NUM_ROUNDS: 1, SHARED_PREFIXES: ["shared."]})
    reply = client_app.train_gate(_msg(RecordDict({ARRAYS: to_record(gate_shared), CONFIG: config}), "train.gate"), ctx)
    assert set(from_record(reply.content[ARRAYS])) == set(gate_shared)
    assert set(ctx.state[client_app.LOCAL_GATE].keys()) == {"decision.weight", "decision.bias", "log_prior"}  # the prior never leaves the client
    if stay_margin:  # nothing beats the own expert (1) by 0.99: every target is 1; prior (0 + 1, 40 + 1) / 42
        prior = from_record(ctx.state[client_app.LOCAL_GATE])["log_prior"].exp()
        assert prior.tolist() == pytest.approx([1 / 42, 41 / 42])

    gate_arrays = reply.content[ARRAYS]
    reply = client_app.evaluate_nmoe(_msg(RecordDict({ARRAYS: gate_arrays, CONFIG: ConfigRecord()}), "evaluate.nmoe"), ctx)
    metrics = reply.content[METRICS]
    # Both bank entries are this client's expert, so NMoE answers exactly as the expert alone.
    assert metrics["accuracy"] == pytest.approx(expert_accuracy, abs=1e-12)
    # Routed away: the samples whose top-1 expert (by this client's gate) is not its own (1).
    g = new_gate(cfg.mlp_hidden, cfg.num_clients, 0)
    g.load_state_dict({**from_record(gate_arrays), **from_record(ctx.state[client_app.LOCAL_GATE])})
    with torch.no_grad():
        top = g(ClientEnv.of(ctx).store.latents("test")).argmax(1)
    assert metrics["routed-to-neighbour"] == pytest.approx(float((top != 1).float().mean()), abs=1e-12)
    assert metrics["num-examples"] == 20


def test_correlation_handler_adds_noise_of_the_expected_std(run_config):
    run_config = {**run_config, "fe-method": "fedsc", "fedsc-proj-dim": 64, "fedsc-mu": 4.0}
    ctx = _context(run_config, {"partition-id": 0, "num-partitions": 2})
    cfg = parse_run_config(run_config)
    init = to_record(new_ssl_model(FMNIST_STATS, cfg.fedsc_proj_dim, 0).state_dict())

    def matrix(noise_multiplier):
        config = ConfigRecord({SERVER_ROUND: 1, NUM_ROUNDS: 1, "noise-multiplier": noise_multiplier})
        reply = client_app.fedsc_correlation(_msg(RecordDict({ARRAYS: init, CONFIG: config}), "query.correlation"), ctx)
        return from_record(reply.content["correlation"])["r"], reply.content[METRICS]

    clean, m0 = matrix(0.0)
    noisy, m1 = matrix(3.0)
    expected = 3.0 * math.sqrt(2) * 4.0 / 40  # z * sqrt(2) mu / n with n = 40 training samples
    assert m0["noise-std"] == 0.0 and m1["noise-std"] == pytest.approx(expected)
    assert m1["num-examples"] == 40
    assert (noisy - clean).std().item() == pytest.approx(expected, rel=0.05)  # 4096 entries
    assert torch.allclose(clean, clean.T, atol=1e-5)  # noiseless R is symmetric


def test_every_message_type_the_server_sends_has_a_handler():
    from nmoe_flwr import constants

    sent = {v for k, v in vars(constants).items() if k.startswith("MSG_")}
    assert sent == set(client_app.app._registered_funcs)  # private, but the only registry Flower keeps


def test_every_handler_leaves_a_timeline_line(run_config):
    """Issue 13.1: the ClientApp's mod writes where a message's time went, on the client's disk."""
    from nmoe_flwr.timeline import TIMELINE_FILE, gaps, read_timeline

    ctx = _context(run_config, {"partition-id": 0, "num-partitions": 2})
    for _ in range(2):
        client_app.app(_msg(RecordDict(), "query.info"), ctx)  # through Flower's dispatch, so through the mods
    lines = read_timeline(ClientEnv.of(ctx).store.folder / TIMELINE_FILE)
    assert [line["message-type"] for line in lines] == ["query.info", "query.info"]
    line = lines[-1]
    assert line["process-start"] <= line["package-import"] <= line["imported"] <= line["handler-start"] <= line["handler-end"]
    assert line["created"] <= line["handler-start"]
    assert all(v >= 0 for k, v in gaps(line).items() if k != "created -> process-start")
