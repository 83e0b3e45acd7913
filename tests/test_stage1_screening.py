"""SCAFFOLD's control variates of scripts/stage1_screening.py (hand-computed, and on
two quadratic clients where FedAvg with several local steps provably drifts)."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "stage1_screening.py"


@pytest.fixture(scope="module")
def Scaffold():
    spec = importlib.util.spec_from_file_location("stage1_screening", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Scaffold


def local_sgd(w: nn.Parameter, a: float, b: float, steps: int, lr: float) -> None:
    """``steps`` SGD steps on the client loss ``a / 2 * (w - b)^2``."""
    opt = torch.optim.SGD([w], lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        (0.5 * a * (w - b).pow(2).sum()).backward()
        opt.step()


def test_control_variates_by_hand(Scaffold):
    scaffold = Scaffold(num_clients=2)
    w = nn.Parameter(torch.tensor([1.0]))
    # Round 1 (no correction yet): one step each from w = 1; gradients a (w - b).
    with scaffold.client(0, {"w": w}):
        local_sgd(w, a=1.0, b=0.0, steps=1, lr=0.5)  # gradient 1, w -> 0.5
    assert w.item() == pytest.approx(0.5)
    with torch.no_grad():
        w.fill_(1.0)
    with scaffold.client(1, {"w": w}):
        local_sgd(w, a=2.0, b=2.0, steps=1, lr=0.5)  # gradient -2, w -> 2
    assert [cv["w"].item() for cv in scaffold.client_cv] == [1.0, -2.0]
    scaffold.end_round()
    assert scaffold.global_cv["w"].item() == pytest.approx(-0.5)
    # Round 2, client 0 from w = 1: corrected gradient 1 + (c - c_0) = 1 + (-0.5 - 1) = -0.5.
    with torch.no_grad():
        w.fill_(1.0)
    with scaffold.client(0, {"w": w}):
        local_sgd(w, a=1.0, b=0.0, steps=1, lr=0.5)
    assert w.item() == pytest.approx(1.25)
    assert scaffold.client_cv[0]["w"].item() == pytest.approx(1.0)  # c_0: the uncorrected gradient
    # Outside the block the hooks are gone: a step from w = 1.25 takes the plain gradient 1.25.
    local_sgd(w, a=1.0, b=0.0, steps=1, lr=0.5)
    assert w.grad.item() == pytest.approx(1.25)
    assert scaffold.client_cv[0]["w"].item() == pytest.approx(1.0)


def test_scaffold_reaches_the_federated_optimum_where_fedavg_drifts(Scaffold):
    """Clients a/2 (w - b)^2 with (a, b) = (1, 0) and (4, 1): the optimum of their mean is
    w* = (1 * 0 + 4 * 1) / 5 = 0.8. FedAvg with K = 10 local steps of lr 0.1 settles where
    sum_i b_i (1 - r_i) / sum_i (1 - r_i), r_i = (1 - lr a_i)^K, i.e. ~0.604."""
    clients, steps, lr = [(1.0, 0.0), (4.0, 1.0)], 10, 0.1
    r = [(1 - lr * a) ** steps for a, _ in clients]
    fedavg_fixed_point = sum(b * (1 - ri) for (_, b), ri in zip(clients, r)) / sum(1 - ri for ri in r)

    def federate(scaffold) -> float:
        x = torch.tensor([0.0])
        for _ in range(300):
            updates = []
            for pid, (a, b) in enumerate(clients):
                w = nn.Parameter(x.clone())
                if scaffold is None:
                    local_sgd(w, a, b, steps, lr)
                else:
                    with scaffold.client(pid, {"w": w}):
                        local_sgd(w, a, b, steps, lr)
                updates.append(w.detach())
            if scaffold is not None:
                scaffold.end_round()
            x = torch.stack(updates).mean(0)
        return x.item()

    assert federate(None) == pytest.approx(fedavg_fixed_point, abs=1e-5)
    assert fedavg_fixed_point == pytest.approx(0.604, abs=1e-3)
    assert federate(Scaffold(num_clients=2)) == pytest.approx(0.8, abs=1e-5)
