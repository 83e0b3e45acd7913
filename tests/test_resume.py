"""Issue 12.3: a federated stage resumed from a per-round checkpoint ends where an uninterrupted one does.

Runs the real ``Federation.partial_fedavg`` (FedCE) against the real ClientApp
through the in-process grid: once for 3 rounds, once stopped after round 1
(its checkpoint kept) and resumed on fresh clients.
"""

import shutil

import pytest
import torch
from inprocess_grid import InProcessGrid

from nmoe_flwr import client_app
from nmoe_flwr.algorithms.fedce import new_classifier
from nmoe_flwr.algorithms.seeding import derive_seed
from nmoe_flwr.config import parse_run_config
from nmoe_flwr.constants import EXTRACTOR_PREFIX, HEAD_PREFIX, MSG_FEDCE
from nmoe_flwr.data import dataset_spec
from nmoe_flwr.pipelines.messaging import Federation
from nmoe_flwr.pipelines.resume import StageCheckpoint
from nmoe_flwr.records import from_record

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture
def run_config(tiny_run_config):
    return {**tiny_run_config, "run-name": "resume", "fedce-rounds": 3}


class _KeepRound(StageCheckpoint):
    """A checkpoint that also keeps a copy of the state after round ``keep`` (the crash point)."""

    def __init__(self, folder, stage, keep, copy_to):
        super().__init__(folder, stage)
        self.keep, self.copy_to = keep, copy_to

    def save(self, **state):
        super().save(**state)
        if state["round"] == self.keep:
            shutil.copy(self.path, self.copy_to)


def _stage(run_config, checkpoint, resume=False):
    cfg = parse_run_config({**run_config, "resume": resume})
    grid = InProcessGrid(client_app.app, {**run_config, "resume": resume}, num_nodes=2)  # fresh clients
    fed = Federation(grid, cfg, {node: i for i, node in enumerate(grid.get_node_ids())}, 1, 10)
    init = new_classifier(dataset_spec(cfg.dataset).pixel_stats, 10, cfg.mlp_hidden, derive_seed(cfg.seed, "fedce-init"))
    return fed.partial_fedavg(init.state_dict(), (EXTRACTOR_PREFIX, HEAD_PREFIX), MSG_FEDCE, 3, checkpoint,
                              cfg.fedce_server_momentum)


@pytest.mark.parametrize("momentum", [0.0, 0.7])
def test_a_stage_resumed_after_round_1_ends_with_the_uninterrupted_weights_and_rounds(run_config, tmp_path, momentum):
    """With server momentum the velocity is checkpointed too: the resumed stage is still bit-exact."""
    run_config = {**run_config, "fedce-server-momentum": momentum}
    folder = tmp_path / "run"
    crash = tmp_path / "after-round-1.pt"
    arrays, rounds, missing = _stage(run_config, _KeepRound(folder, "fedce", 1, crash))
    assert sorted(rounds) == [1, 2, 3] and missing == {}
    assert StageCheckpoint(folder, "fedce").load()["round"] == 3

    resumed_folder = tmp_path / "resumed"
    (resumed_folder / "resume").mkdir(parents=True)
    shutil.copy(crash, resumed_folder / "resume" / "fedce.pt")
    assert StageCheckpoint(resumed_folder, "fedce").load()["round"] == 1
    arrays2, rounds2, _ = _stage(run_config, StageCheckpoint(resumed_folder, "fedce"), resume=True)

    assert sorted(rounds2) == [1, 2, 3]
    loss = {r: m["train-loss"] for r, m in rounds.items()}
    assert {r: m["train-loss"] for r, m in rounds2.items()} == loss  # round 1 from the checkpoint, 2-3 recomputed
    a, b = from_record(arrays), from_record(arrays2)
    assert list(a) == list(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)

    # A finished stage is not run again: its result comes back from the checkpoint.
    arrays3, rounds3, _ = _stage(run_config, StageCheckpoint(folder, "fedce"), resume=True)
    assert {r: m["train-loss"] for r, m in rounds3.items()} == loss
    for key, value in from_record(arrays3).items():
        torch.testing.assert_close(value, a[key], rtol=0, atol=0)


def test_resume_config_is_the_recorded_one_set_to_resume_in_place(tmp_path, capsys):
    import json

    from nmoe_flwr.cli.run import main, resume_config

    folder = tmp_path / "out" / "paper"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(
        {"run": {"status": "running"}, "config": {"seed": 3, "dp-epsilon": "inf", "run-name": "", "output-dir": ""}}))
    config = resume_config(folder)
    assert config == {"seed": 3, "dp-epsilon": float("inf"), "run-name": "paper",
                      "output-dir": str(folder.parent.resolve()), "resume": True}
    assert main(["--resume", str(tmp_path / "nope")]) == 2
    assert "--resume takes the folder of a run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--resume", str(folder), "--set", "seed=1"])


def test_the_expert_bank_checkpoint_reads_back_through_the_weights_only_loader(tmp_path):
    """Stage 2's support vectors are numpy arrays, which ``torch.load(weights_only=True)`` refuses:
    a run killed after stage 2 could not resume until they were stored as tensors."""
    import numpy as np

    from nmoe_flwr.pipelines.resume import BANK_STAGE, load_bank, save_bank

    checkpoint = StageCheckpoint(tmp_path, BANK_STAGE)
    assert load_bank(checkpoint) is None
    bank = {0: {"w": torch.ones(2, 3)}, 3: {"w": torch.zeros(2, 3)}}
    support = {0: np.array([900, 12, 11], dtype=np.int64), 3: np.array([11, 900, 12], dtype=np.int64)}
    save_bank(checkpoint, bank, support)
    got_bank, got_support = load_bank(checkpoint)
    assert sorted(got_bank) == [0, 3] and torch.equal(got_bank[3]["w"], torch.zeros(2, 3))
    assert {pid: s.tolist() for pid, s in got_support.items()} == {0: [900, 12, 11], 3: [11, 900, 12]}
    assert all(isinstance(s, np.ndarray) and s.dtype == np.int64 for s in got_support.values())


def test_a_checkpoint_the_loader_would_refuse_is_refused_at_save_and_the_last_good_round_kept(tmp_path):
    """Found at save time, not when a killed run tries to resume: numpy in a checkpoint raises,
    and the previous round's file stays readable."""
    import numpy as np

    checkpoint = StageCheckpoint(tmp_path, "fedce")
    checkpoint.save(round=1, arrays={"w": torch.ones(2)})
    with pytest.raises(TypeError, match="weights_only"):
        checkpoint.save(round=2, arrays={"w": np.ones(2)})
    assert checkpoint.load()["round"] == 1
    assert not list(checkpoint.path.parent.glob("*.tmp"))


def test_a_run_resumed_after_the_gates_trained_evaluates_with_their_local_layers(tiny_run_config, tmp_path):
    """A resume is a new Flower run id on the same run folder. The gates' local part (here the
    log-prior offset of ``gate-logit-adjust``) must come back from the clients' disks, or NMoE is
    scored with prior-free gates: this happened to a seed of nmoe-reproduce resumed after stage 3."""
    import json

    from nmoe_flwr.constants import MSG_EVAL_NMOE
    from nmoe_flwr.pipelines.messaging import weights_message
    from nmoe_flwr.pipelines.nmoe import train_experts, train_gates
    from nmoe_flwr.pipelines.results import RunRecorder
    from nmoe_flwr.records import to_record

    run_config = {**tiny_run_config, "num-clients": 3, "gate-rounds": 2, "expert-epochs": 2,
                  "gate-method": "fedavg", "gate-logit-adjust": 1.0}
    cfg = parse_run_config(run_config)

    def federation(config, run_id):
        grid = InProcessGrid(client_app.app, config, num_nodes=3, run_id=run_id)  # fresh contexts
        return Federation(grid, parse_run_config(config), {n: i for i, n in enumerate(grid.get_node_ids())}, 1, 10)

    def saved_priors():
        folder = tmp_path / "out" / "tiny" / "checkpoints"
        return [torch.load(folder / f"client-{pid}" / "gate.pt", weights_only=True)["log_prior"] for pid in range(3)]

    fed = federation(run_config, run_id=1)
    rec = RunRecorder(tmp_path / "run", cfg.to_dict(), run_id=1)
    init = new_classifier(dataset_spec(cfg.dataset).pixel_stats, 10, cfg.mlp_hidden, derive_seed(cfg.seed, "c"))
    bank, support = train_experts(fed, rec, to_record(init.state_dict()))
    gate = train_gates(fed, rec, bank, support)
    before = fed.broadcast_metrics(weights_message(gate), MSG_EVAL_NMOE)
    priors = saved_priors()
    assert all(p.abs().sum() > 0 for p in priors)  # the offset is on, and local to each client

    resumed = federation({**run_config, "resume": True}, run_id=2)
    after = resumed.broadcast_metrics(weights_message(gate), MSG_EVAL_NMOE)
    assert json.dumps(after, sort_keys=True) == json.dumps(before, sort_keys=True)
    for p, q in zip(saved_priors(), priors):
        torch.testing.assert_close(p, q, rtol=0, atol=0)

    # A later run that does not resume must not pick up this run's local layers.
    federation(run_config, run_id=3).broadcast_metrics(weights_message(gate), MSG_EVAL_NMOE)
    assert all(torch.count_nonzero(p) == 0 for p in saved_priors())
