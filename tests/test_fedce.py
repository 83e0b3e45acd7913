"""FedCE's local step: plain and logit-adjusted cross entropy, FedProx's term (hand-computed)."""

import math

import pytest
import torch
from torch import nn

from nmoe_flwr.algorithms.fedce import logit_adjusted_ce, proximal
from nmoe_flwr.algorithms.training import log_prior


class FixedLogits(nn.Module):
    """Returns the same logits for every input (a model whose loss we can work out)."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1)


def test_log_prior_by_hand():
    # counts [2, 1, 0] + smoothing 1 -> [3, 2, 1] / 6
    prior = log_prior(torch.tensor([0, 0, 1]), 3)
    assert prior.exp().tolist() == pytest.approx([3 / 6, 2 / 6, 1 / 6])


def test_logit_adjusted_ce_adds_the_offset_before_the_softmax():
    model = FixedLogits([0.0, 0.0])
    offset = torch.tensor([math.log(0.9), math.log(0.1)])
    loss, correct = logit_adjusted_ce(offset)(model, (torch.zeros(2, 1), torch.tensor([1, 0])))
    # softmax(logits + log pi) = pi = (0.9, 0.1): mean of -log 0.1 and -log 0.9
    assert float(loss.detach()) == pytest.approx((-math.log(0.1) - math.log(0.9)) / 2)
    assert int(correct) == 1  # both samples predicted as class 0 under the prior


def test_logit_adjusted_optimum_is_prior_free():
    """On a client whose data is 90 % class 0, the adjusted loss is minimised by
    equal logits (the data carry no evidence beyond the prior), plain CE by
    logits that encode the prior."""
    labels = torch.tensor([0] * 9 + [1])
    offset = log_prior(labels, 2, smoothing=0.0)
    model = FixedLogits([0.3, -0.2])
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(500):
        opt.zero_grad()
        logit_adjusted_ce(offset)(model, (torch.zeros(10, 1), labels))[0].backward()
        opt.step()
    gap = float((model.logits[0] - model.logits[1]).detach())
    assert gap == pytest.approx(0.0, abs=1e-3)


class SharedAndLocal(nn.Module):
    """Two parameter groups: ``shared.w`` (averaged by a server) and ``local.w`` (kept)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Module()
        self.shared.w = nn.Parameter(torch.tensor([1.0, 2.0]))
        self.local = nn.Module()
        self.local.w = nn.Parameter(torch.tensor([0.0]))


def zero_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    return 0.0 * (model.shared.w.sum() + model.local.w.sum()), torch.tensor(7)


def test_proximal_term_by_hand():
    """mu / 2 * ||w - w_t||^2 over the shared parameters only, gradient mu * (w - w_t)."""
    model = SharedAndLocal()
    loss_fn = proximal(zero_loss, model, mu=0.5, prefixes=["shared."])  # w_t = (1, 2)
    with torch.no_grad():
        model.shared.w.copy_(torch.tensor([2.0, 4.0]))  # w - w_t = (1, 2): ||.||^2 = 5
        model.local.w.copy_(torch.tensor([10.0]))  # local: no pull, whatever it drifts to
    loss, correct = loss_fn(model, (torch.zeros(1),))
    assert float(loss.detach()) == pytest.approx(0.5 / 2 * 5)
    assert int(correct) == 7  # the wrapped loss's count passes through
    loss.backward()
    assert model.shared.w.grad.tolist() == pytest.approx([0.5 * 1, 0.5 * 2])
    assert model.local.w.grad.tolist() == [0.0]


def test_proximal_pull_keeps_the_shared_weights_near_the_server_s():
    """SGD on a loss that pulls w to (0, 0) from w_t = (1, 2): FedProx's optimum is
    w_t * mu / (1 + mu) (minimum of ||w||^2 / 2 + mu / 2 ||w - w_t||^2)."""
    model = SharedAndLocal()

    def to_zero(m, batch):
        return 0.5 * m.shared.w.pow(2).sum(), torch.tensor(0)

    loss_fn = proximal(to_zero, model, mu=3.0, prefixes=["shared."])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        loss_fn(model, (torch.zeros(1),))[0].backward()
        opt.step()
    assert model.shared.w.detach().tolist() == pytest.approx([0.75, 1.5], abs=1e-5)


def test_proximal_refuses_prefixes_that_name_no_parameter():
    with pytest.raises(ValueError, match="no trainable parameter"):
        proximal(zero_loss, SharedAndLocal(), mu=1.0, prefixes=["extractor."])
    with pytest.raises(ValueError, match="mu must be >= 0"):
        proximal(zero_loss, SharedAndLocal(), mu=-1.0, prefixes=["shared."])
