"""GlobalMoE with restricted routing (``allowed``) and a client's global-MoE round
(:func:`nmoe_flwr.algorithms.global_moe.train_moe_round`)."""

import math

import pytest
import torch
from torch import nn

from nmoe_flwr.algorithms.global_moe import (
    MoERoundFeedback,
    per_expert_loss,
    train_moe_round,
)
from nmoe_flwr.algorithms.models import GlobalMoE, mixture_nll
from nmoe_flwr.algorithms.seeding import seeded
from nmoe_flwr.algorithms.training import Runtime
from nmoe_flwr.config import parse_run_config

D, HIDDEN, C, E = 4, 8, 2, 4
ALLOWED = [1, 3]
CPU = Runtime(torch.device("cpu"))


def _model(seed: int = 0) -> GlobalMoE:
    with seeded(seed):
        return GlobalMoE(D, HIDDEN, C, E)


def _favour(model: GlobalMoE, bias: list[float]) -> None:
    """Make the gate's logits equal ``bias`` for every input (decision weight 0)."""
    with torch.no_grad():
        model.gate.decision.weight.zero_()
        model.gate.decision.bias.copy_(torch.tensor(bias))


def _separable(n: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes split by the sign of the first coordinate, well apart."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C
    h = torch.randn(n, D, generator=g) * 0.3
    h[:, 0] += 2.0 * (2 * y - 1).float()
    return h, y


def _count_expert_calls(model: GlobalMoE) -> list[int]:
    calls = [0] * E
    for j, expert in enumerate(model.experts):
        expert.register_forward_hook(lambda m, i, o, j=j: calls.__setitem__(j, calls[j] + 1))
    return calls


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("k", [1, 2])
def test_restricted_routing_never_uses_other_experts(k, train):
    """With allowed=[1, 3] and the gate favouring 0 and 2, top-1/top-2 pick and run only 1 and 3,
    and the mixture is the hand-computed combination of experts 3 and 1."""
    model = _model()
    _favour(model, [100.0, 1.0, 50.0, 2.0])
    model.train(train)
    h, _ = _separable(16)
    _, top_free = model(h, 1)
    assert top_free.tolist() == [0] * 16  # control: unrestricted, the bias wins
    calls = _count_expert_calls(model)
    probs, top = model(h, k, ALLOWED)
    assert top.tolist() == [3] * 16  # logit 2 > 1 among the allowed
    assert calls[0] == calls[2] == 0  # never run, not only never picked
    with torch.no_grad():
        p1, p3 = (model.experts[j](h).softmax(-1) for j in (1, 3))
    if k == 1:
        expected = p3
    else:  # softmax([2, 1]) over the kept scores
        w3 = math.e / (math.e + 1.0)
        expected = w3 * p3 + (1 - w3) * p1
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-5)


def test_noisy_restricted_routing_stays_within_allowed():
    """Gate noise mixes experts 1 and 3 but never reaches the masked ones."""
    model = _model()
    _favour(model, [100.0, 0.0, 100.0, 0.0])
    model.train()
    h, _ = _separable(200)
    noise = torch.Generator().manual_seed(1)
    _, top = model(h, 1, ALLOWED, noise_std=5.0, generator=noise)
    assert set(top.tolist()) == {1, 3}  # both used thanks to the noise, nothing else


def test_gradient_reaches_only_allowed_experts_and_the_gate():
    """Top-2 training loss: experts 0 and 2 get no gradient; 1, 3 and the gate do,
    and the gate's decision bias gets gradient only in the allowed rows."""
    model = _model()
    _favour(model, [100.0, 1.0, 50.0, 2.0])
    model.gate.decision.weight.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    model.train()
    h, y = _separable(16)
    probs, _ = model(h, 2, ALLOWED)
    mixture_nll(probs, y).backward()
    for j in (0, 2):
        assert all(p.grad is None or not p.grad.any() for p in model.experts[j].parameters()), j
    for j in (1, 3):
        assert all(p.grad is not None and p.grad.any() for p in model.experts[j].parameters()), j
    bias_grad = model.gate.decision.bias.grad
    assert bias_grad[[0, 2]].tolist() == [0.0, 0.0]
    assert bias_grad[1] != 0 and bias_grad[3] != 0
    assert bias_grad[1] == pytest.approx(-bias_grad[3].item(), abs=1e-6)  # softmax over two scores
    assert model.gate.shared[0].weight.grad.abs().sum() > 0


def _cfg(**extra):
    return parse_run_config({
        "batch-size": 8, "moe-local-epochs": 4, "mlp-hidden": HIDDEN, "num-experts": E, "moe-lr": 0.01, **extra,
    })


def _own_per_expert_loss(model: GlobalMoE, h, y, allowed) -> dict[int, tuple[float, int]]:
    """Top-1 routing restricted to ``allowed`` and each expert's mean CE on its samples,
    computed without the library's router."""
    model.eval()
    with torch.no_grad():
        logits = model.gate(h)
        masked = torch.full_like(logits, -math.inf)
        masked[:, allowed] = logits[:, allowed]
        top = masked.argmax(1)
        out = {}
        for j in allowed:
            rows = top == j
            n = int(rows.sum())
            out[j] = (float(nn.functional.cross_entropy(model.experts[j](h[rows]), y[rows])) if n else 0.0, n)
    return out


def test_train_moe_round_feedback_matches_independent_computation():
    """routed sums to N over exactly the allowed experts, routing_share is the unrestricted
    top-1 share (length E, sums to 1), improvement = (before - after) / before, and the loss drops."""
    model = _model(7)  # seed 7: both allowed experts get samples, the unrestricted router prefers 0 and 2
    h, y = _separable()
    before = _own_per_expert_loss(model, h, y, ALLOWED)
    assert per_expert_loss(model, h, y, ALLOWED) == pytest.approx(before, rel=1e-6)
    out = train_moe_round(model, ALLOWED, h, y, _cfg(), CPU, seed=5)
    after = _own_per_expert_loss(model, h, y, ALLOWED)
    assert per_expert_loss(model, h, y, ALLOWED) == pytest.approx(after, rel=1e-6)

    assert isinstance(out, MoERoundFeedback)
    assert list(out.routed) == ALLOWED and list(out.improvement) == ALLOWED
    assert sum(out.routed.values()) == h.shape[0]
    assert out.routed == {j: after[j][1] for j in ALLOWED}
    assert out.stats.num_examples == h.shape[0]

    with torch.no_grad():
        free = model.gate(h).argmax(1)
    share = [float((free == j).sum()) / h.shape[0] for j in range(E)]
    assert len(out.routing_share) == E
    assert sum(out.routing_share) == pytest.approx(1.0, abs=1e-6)
    assert out.routing_share == pytest.approx(share, abs=1e-7)

    for j in ALLOWED:
        lb, la = before[j][0], after[j][0]
        expected = (lb - la) / lb if lb > 0 else 0.0
        assert out.improvement[j] == pytest.approx(expected, rel=1e-5, abs=1e-7), j
    assert all(before[j][1] and after[j][1] for j in ALLOWED), (before, after)
    assert all(out.improvement[j] > 0.5 for j in ALLOWED), out.improvement  # a separable problem is learnt
    assert out.routing_share[1] + out.routing_share[3] < sum(out.routed.values()) / h.shape[0]  # not the restricted share


def test_train_moe_round_is_deterministic_for_a_seed():
    """The same model, data and seed give the same feedback and weights."""
    h, y = _separable()
    runs = []
    for _ in range(2):
        model = _model(1)
        out = train_moe_round(model, ALLOWED, h, y, _cfg(), CPU, seed=5)
        runs.append((out.routed, out.improvement, out.routing_share, model.state_dict()))
    assert runs[0][:3] == runs[1][:3]
    for k, v in runs[0][3].items():
        assert torch.equal(v, runs[1][3][k]), k


def test_expert_without_samples_reports_zero_improvement():
    """An allowed expert the router never sends a sample to (before or after) reports 0 routed and 0.0."""
    model = _model(1)
    _favour(model, [0.0, -1000.0, 0.0, 1000.0])
    h, y = _separable()
    out = train_moe_round(model, ALLOWED, h, y, _cfg(), CPU, seed=5)
    assert out.routed == {1: 0, 3: h.shape[0]}
    assert out.improvement[1] == 0.0
    assert out.improvement[3] > 0.1


def _fixed_expert(model: GlobalMoE, j: int, logits: list[float]) -> None:
    """Expert ``j`` answers ``logits`` for every input."""
    last = model.experts[j].net[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor(logits))


def test_expert_that_loses_all_its_samples_does_not_report_full_improvement():
    """All samples start on expert 1 (always wrong); training moves the gate to expert 3
    (always right). Expert 1 ends with no samples: its improvement must be 0.0, not 1.0."""
    model = _model(1)
    _favour(model, [0.0, 0.1, 0.0, 0.0])
    _fixed_expert(model, 1, [-5.0, 5.0])
    _fixed_expert(model, 3, [5.0, -5.0])
    h, _ = _separable(32)
    y = torch.zeros(32, dtype=torch.long)  # one class: expert 3 is right on every sample
    assert per_expert_loss(model, h, y, ALLOWED)[1][1] == 32  # control: all on expert 1 before
    out = train_moe_round(model, ALLOWED, h, y, _cfg(**{"moe-lr": 0.05, "gate-noise": 0.0}), CPU, seed=5)
    assert out.routed == {1: 0, 3: 32}  # the gate moved every sample
    assert out.improvement[1] == 0.0
