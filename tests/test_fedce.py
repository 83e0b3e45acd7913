"""FedCE's local step: plain and logit-adjusted cross entropy (hand-computed)."""

import math

import pytest
import torch
from torch import nn

from nmoe_flwr.algorithms.fedce import logit_adjusted_ce
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
