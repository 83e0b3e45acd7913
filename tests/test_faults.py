"""Issue 12.2: seeded fault injection, and what each stage does without a client.

Unit tests here; the end-to-end runs with drop-outs are in test_e2e_flwr_run.py.
"""

import math
import random

import pytest
import torch
from flwr.app import Message, RecordDict

from nmoe_flwr.algorithms.experts import frozen_bank, new_expert
from nmoe_flwr.algorithms.gate import (
    available,
    bank_probs,
    mask_missing,
    new_gate,
    train_gate,
)
from nmoe_flwr.algorithms.training import resolve_runtime
from nmoe_flwr.config import RunConfig
from nmoe_flwr.faults import InjectedFault, fault_of, inject
from nmoe_flwr.inference.evaluation import nmoe_metrics
from nmoe_flwr.pipelines.messaging import ClientFailure, send_to_all

RT = resolve_runtime("cpu", "off", False)


def test_fault_draws_are_seeded_and_hit_the_rates():
    draws = [fault_of(0, pid, "fedce", rnd, 0.1, 0.2) for pid in range(40) for rnd in range(1, 101)]
    assert draws == [fault_of(0, pid, "fedce", rnd, 0.1, 0.2) for pid in range(40) for rnd in range(1, 101)]
    n = len(draws)  # 4000 draws: binomial std of a share ~0.006
    assert abs(draws.count("drop") / n - 0.1) < 0.025
    assert abs(draws.count("straggle") / n - 0.2) < 0.03
    assert fault_of(0, 3, "fedce", 1, 0.0, 0.0) is None
    other_seed = [fault_of(1, pid, "fedce", rnd, 0.1, 0.2) for pid in range(40) for rnd in range(1, 101)]
    assert other_seed != draws


def test_inject_raises_for_a_drop_and_sleeps_past_the_timeout_for_a_straggler():
    cfg = RunConfig(fault_drop_rate=0.5, fault_straggler_rate=0.4, round_timeout=7.0)
    slept = []
    kinds = {}
    for rnd in range(1, 40):
        kind = fault_of(cfg.seed, 2, "gate", rnd, 0.5, 0.4)
        kinds[kind] = rnd
    with pytest.raises(InjectedFault, match="injected drop-out of partition 2 in gate round"):
        inject(cfg, 2, "gate", kinds["drop"], sleep=slept.append)
    inject(cfg, 2, "gate", kinds["straggle"], sleep=slept.append)
    assert slept == [9.0]
    inject(cfg, 2, "gate", kinds[None], sleep=slept.append)
    assert slept == [9.0]


def test_the_rates_must_leave_someone_to_answer():
    from nmoe_flwr.config import ConfigError, parse_run_config

    with pytest.raises(ConfigError, match="fault-drop-rate \\+ fault-straggler-rate must be < 1"):
        parse_run_config({"fault-drop-rate": 0.6, "fault-straggler-rate": 0.4})


def _bank(missing: set[int], n: int = 4, classes: int = 3):
    states = {j: new_expert(classes, 8, seed=j).state_dict() for j in range(n) if j not in missing}
    return frozen_bank(states, n, 8, classes, RT)


def test_a_lost_expert_is_a_gap_in_the_bank_with_zero_probabilities():
    bank = _bank({2})
    assert [e is None for e in bank] == [False, False, True, False]
    probs = bank_probs(bank, torch.randn(5, 64))
    assert probs.shape == (5, 4, 3)
    assert torch.equal(probs[:, 2], torch.zeros(5, 3))
    torch.testing.assert_close(probs[:, [0, 1, 3]].sum(-1), torch.ones(5, 3))


def test_a_masked_expert_is_never_routed_to_in_training_or_at_inference():
    bank = _bank({1})
    g = new_gate(8, 4, seed=0)
    with torch.no_grad():  # make the lost expert the gate's favourite before masking
        g.decision.bias[1] = 100.0
    mask_missing(g, available(bank))
    assert math.isinf(g.log_prior[1]) and g.log_prior[1] < 0
    h, y = torch.randn(64, 64), torch.randint(0, 3, (64,))
    assert (g(h).argmax(1) != 1).all()
    cfg = RunConfig(num_clients=4, gate_logit_adjust=1.0, batch_size=16)
    probs = bank_probs(bank, h)
    stats = train_gate(g, h, y, probs, cfg, RT, server_round=1, num_rounds=1, seed=0, present=available(bank))
    assert math.isfinite(stats.loss)  # -inf logits do not turn the loss into NaN
    assert math.isinf(g.log_prior[1])  # the routing prior is recomputed, the mask kept
    metrics = nmoe_metrics(g, bank, h, y, own_expert=0, num_classes=3, k=2)
    assert 0.0 <= metrics["accuracy"] <= 1.0


def test_a_device_whose_own_expert_was_lost_still_classifies_through_its_neighbours():
    bank = _bank({0})
    g = mask_missing(new_gate(8, 4, seed=0), available(bank))
    h, y = torch.randn(32, 64), torch.randint(0, 3, (32,))
    metrics = nmoe_metrics(g, bank, h, y, own_expert=0, num_classes=3, k=1)
    assert metrics["routed-to-neighbour"] == 1.0


class _Grid:
    """Answers like nodes would: some fail, some never answer, and for nodes the SuperLink
    counts as offline it answers itself (sender: the SuperLink's id, 1)."""

    def __init__(self, failing=(), silent=(), offline=()):
        self.failing, self.silent, self.offline = set(failing), set(silent), set(offline)

    def send_and_receive(self, messages, timeout=None):
        import uuid

        from flwr.app import Error

        out = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's grids do when pushing
            node = m.metadata.dst_node_id
            if node in self.silent:
                continue
            if node in self.failing:
                out.append(Message(Error(code=0, reason="boom"), reply_to=m))
            elif node in self.offline:
                reply = Message(Error(code=4, reason="Node Unavailable"), reply_to=m)
                reply.metadata.__dict__["_src_node_id"] = 1  # SUPERLINK_NODE_ID
                out.append(reply)
            else:
                out.append(Message(RecordDict(), reply_to=m))
        return out


@pytest.mark.usefixtures("task_identity")
def test_send_to_all_records_missing_nodes_or_fails_naming_them():
    contents = {n: RecordDict() for n in (1, 2, 3)}
    with pytest.raises(ClientFailure, match="node 2: error reply: boom.*node 3: no reply within the round timeout"):
        send_to_all(_Grid(failing={2}, silent={3}), contents, "train.expert", 1.0)
    missing = {}
    replies = send_to_all(_Grid(failing={2}, silent={3}), contents, "train.expert", 1.0, missing)
    assert list(replies) == [1]
    assert missing == {2: "error reply: boom", 3: "no reply within the round timeout"}
    with pytest.raises(ClientFailure, match="no node answered"):
        send_to_all(_Grid(failing={1, 2, 3}), contents, "train.expert", 1.0, {})
    missing = {}  # issue 12.4: the SuperLink's "Node Unavailable" reply is put on the dead node, not on node 1
    send_to_all(_Grid(offline={3}), {n: RecordDict() for n in (7, 3, 9)}, "evaluate.nmoe", 1.0, missing)
    assert missing == {3: "error reply: Node Unavailable"}


def test_a_round_waits_for_lost_nodes_only_as_long_as_allowed(task_identity):
    """Issue 12.4: Flower's sample_nodes waits forever for min_available_nodes; our strategies wait
    node_wait seconds, then go on with the connected nodes if they are at least min_replies."""
    import time

    from flwr.app import ArrayRecord, ConfigRecord

    from nmoe_flwr.strategies import PartialFedAvg
    from nmoe_flwr.strategies.nodes import NodesLost, wait_for_nodes

    class _TwoOfThree:
        def get_node_ids(self):
            return [1, 2]

    t0 = time.monotonic()
    with pytest.raises(NodesLost, match="only 2 of the 3 nodes needed are connected after 0.3 s"):
        wait_for_nodes(_TwoOfThree(), 3, 0.3, "train.fedce round 2", poll=0.05)
    assert time.monotonic() - t0 < 2
    assert wait_for_nodes(_TwoOfThree(), 3, 0.1, "x", at_least=2, poll=0.05) == [1, 2]
    assert wait_for_nodes(_TwoOfThree(), 2, 0.0, "x") == [1, 2]

    going_on = PartialFedAvg(["shared."], min_available_nodes=3, min_train_nodes=3, node_wait=0.2)
    messages = going_on.configure_train(2, ArrayRecord(), ConfigRecord(), _TwoOfThree())
    assert [m.metadata.dst_node_id for m in messages] == [1, 2]
    assert going_on.connected[2] == [1, 2]
    assert messages[0].content["config"]["server-round"] == 2
    too_few = PartialFedAvg(["shared."], min_available_nodes=3, node_wait=0.2, min_replies=3)
    with pytest.raises(NodesLost, match="only 2 of the 3 nodes needed"):
        too_few.configure_train(2, ArrayRecord(), ConfigRecord(), _TwoOfThree())


def test_node_samples_are_seeded_and_sized_like_fedavg():
    """Issue 13.2: Flower's sample_nodes draws from the unseeded global random."""
    from nmoe_flwr.strategies.nodes import sample_nodes

    nodes = list(range(100, 200))
    a = sample_nodes(nodes, 0.1, 2, seed=0, server_round=1)
    assert len(a) == 10 and a == sorted(a) and set(a) <= set(nodes)
    assert a == sample_nodes(list(reversed(nodes)), 0.1, 2, seed=0, server_round=1)  # order of ids does not matter
    assert a != sample_nodes(nodes, 0.1, 2, seed=0, server_round=2)
    assert a != sample_nodes(nodes, 0.1, 2, seed=1, server_round=1)
    assert len(sample_nodes(nodes, 0.01, 5, 0, 1)) == 5  # min_nodes wins over the fraction
    assert sample_nodes([3, 1, 2], 1.0, 5, 0, 1) == [1, 2, 3]  # never more than connected


def test_node_samples_follow_partitions_not_the_runs_random_node_ids():
    """Node ids are random per Flower run: with the partition ids as ``order`` two runs (different ids, same
    partitions) sample the same partitions; without it they need not."""
    from nmoe_flwr.strategies.nodes import sample_nodes

    rng = random.Random(7)
    run_a = dict(zip(rng.sample(range(10**9), 100), range(100)))  # node id -> partition id
    run_b = dict(zip(rng.sample(range(10**9), 100), range(100)))
    parts = [[order[n] for n in sample_nodes(list(order), 0.1, 1, seed=0, server_round=3, order=order)]
             for order in (run_a, run_b)]
    assert sorted(parts[0]) == sorted(parts[1]) and len(parts[0]) == 10
    unordered = [sorted(order[n] for n in sample_nodes(list(order), 0.1, 1, seed=0, server_round=3)) for order in (run_a, run_b)]
    assert unordered[0] != unordered[1]  # what happened before: the same seed sampled other clients
    # nodes the order does not know (joined late) come after the ranked ones and are still sampled by id
    late = sample_nodes([*run_a, 5, 6], 0.5, 1, 0, 1, order=run_a)
    assert len(late) == 51 and late == sample_nodes([6, 5, *run_a], 0.5, 1, 0, 1, order=run_a)
    assert {5, 6} & set(sample_nodes([*run_a, 5, 6], 1.0 - 1e-9, 1, 0, 1, order=run_a))


def test_local_layers_survive_a_restarted_node_but_not_a_new_run(tmp_path):
    """Issue 12.4: a SuperNode restarted mid-run has an empty context.state; the local (never averaged)
    entries come back from its disk, and only for the same run."""
    from flwr.app import Context, RecordDict
    from torch import nn

    from nmoe_flwr.client_state import ClientStore, load_partial, split_partial
    from nmoe_flwr.records import to_record

    def context(run_id):
        return Context(run_id=run_id, node_id=1, node_config={}, state=RecordDict(), run_config={})

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))  # "0." shared, "1." local
    store = ClientStore(tmp_path / "clients" / "0")
    shared = split_partial(model, ["0."], context(7), "local-gate", store)
    assert sorted(shared) == ["0.bias", "0.weight"]

    fresh = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    load_partial(fresh, to_record({}), context(7), "local-gate", store)  # restarted node, same run
    assert torch.equal(fresh[1].weight, model[1].weight)
    other = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    before = other[1].weight.clone()
    load_partial(other, to_record({}), context(8), "local-gate", store)  # a later run, same folder
    assert torch.equal(other[1].weight, before)
