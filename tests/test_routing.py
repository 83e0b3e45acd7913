"""Routing diagnostics, oracle routings and the gate's routing target, on hand-built cases."""

import math

import pytest
import torch

from nmoe_flwr.algorithms.gate import gate_loss, routing_log_prior, routing_targets
from nmoe_flwr.algorithms.models import Gate
from nmoe_flwr.algorithms.routing import (
    class_owners,
    dominant_class,
    oracle_predictions,
    owner_routing,
    routing_diagnostics,
)


def test_class_owners_follow_the_dominant_partition():
    assert dominant_class(13, 10) == 3
    owners = class_owners(12, 10)
    assert owners[0] == [0, 10] and owners[1] == [1, 11] and owners[9] == [9]


def test_routing_diagnostics_by_hand():
    # Client 0 (dominant class 0) with owners 0->0, 1->1, 2->2.
    owners = {0: [0], 1: [1], 2: [2]}
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    top1 = torch.tensor([0, 0, 0, 2, 1, 0, 1, 2])
    d = routing_diagnostics(top1, labels, own=0, owners=owners, num_classes=3)
    assert d["routed-to-neighbour"] == pytest.approx(4 / 8)  # rows 3, 4, 6, 7
    assert d["dominant-sent-away"] == pytest.approx(1 / 4)  # row 3
    assert d["minority-to-owner"] == pytest.approx(2 / 4)  # rows 4 (1->1) and 7 (2->2); 5 stays, 6 goes to the wrong owner


def test_routing_diagnostics_leave_out_empty_groups():
    d = routing_diagnostics(torch.tensor([0, 1]), torch.tensor([0, 0]), own=0, owners={0: [0], 1: [1]}, num_classes=2)
    assert "minority-to-owner" not in d and d["dominant-sent-away"] == pytest.approx(0.5)


def test_owner_routing_keeps_own_classes_and_classes_without_owner():
    owners = {0: [0, 3], 1: [1], 2: []}
    assert owner_routing(torch.tensor([0, 1, 2, 1]), own=3, owners=owners).tolist() == [3, 1, 3, 1]


def test_oracles_by_hand():
    # 2 samples, 3 experts, 2 classes. Sample 0 has label 1, sample 1 label 0; own = 0.
    probs = torch.tensor([
        [[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]],
        [[0.3, 0.7], [0.6, 0.4], [0.45, 0.55]],
    ])
    labels = torch.tensor([1, 0])
    owners = {0: [0], 1: [2]}
    pred = oracle_predictions(probs, labels, own=0, owners=owners)
    # class owner: sample 0 -> expert 2 (predicts 1), sample 1 -> own expert 0 (predicts 1)
    assert pred["class-owner"].tolist() == [1, 1]
    # best expert on the true label: sample 0 -> expert 1 (0.8), sample 1 -> expert 1 (0.6)
    assert pred["best-expert"].tolist() == [1, 0]


def test_routing_targets_pick_the_expert_most_confident_on_the_label():
    probs = torch.tensor([[[0.9, 0.1], [0.2, 0.8]], [[0.7, 0.3], [0.6, 0.4]]])
    assert routing_targets(probs, torch.tensor([1, 0])).tolist() == [1, 0]
    assert routing_targets(probs, torch.tensor([1, 1])).tolist() == [1, 1]


def test_stay_margin_keeps_the_own_expert_unless_a_neighbour_is_clearly_better():
    # p_j(y) on the label: sample 0 (0.80, 0.85, 0.10): neighbour 1 better by 0.05;
    # sample 1 (0.30, 0.90, 0.20): neighbour 1 better by 0.60; sample 2 (0.70, 0.10, 0.60): own is best
    on_label = torch.tensor([[0.80, 0.85, 0.10], [0.30, 0.90, 0.20], [0.70, 0.10, 0.60]])
    probs = torch.stack([1 - on_label, on_label], dim=2)  # 2 classes, every label is 1
    y = torch.ones(3, dtype=torch.long)
    assert routing_targets(probs, y).tolist() == [1, 1, 0]
    assert routing_targets(probs, y, own=0, stay_margin=0.1).tolist() == [0, 1, 0]
    assert routing_targets(probs, y, own=0, stay_margin=0.7).tolist() == [0, 0, 0]
    assert routing_targets(probs, y, own=2, stay_margin=0.1).tolist() == [1, 1, 2]  # 0.60 >= 0.70 - 0.1
    assert routing_targets(probs, y, own=0, stay_margin=0.0).tolist() == [1, 1, 0]  # margin 0: plain argmax
    # the prior counts the margin's targets: own 0 twice, expert 1 once, + 1 smoothing each
    prior = routing_log_prior(probs, y, own=0, stay_margin=0.1)
    assert prior.exp().tolist() == pytest.approx([3 / 6, 2 / 6, 1 / 6])


def test_gate_loss_routes_toward_the_stay_target():
    gate = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        gate.weight.copy_(torch.eye(2))
    h = torch.tensor([[2.0, 0.0]])  # logits (2, 0)
    y = torch.tensor([1])
    probs = torch.tensor([[[0.2, 0.8], [0.1, 0.9]]])  # expert 1 is better on the label by 0.1
    g = torch.Generator().manual_seed(0)
    plain, _ = gate_loss(2, 0.0, g)(gate, (h, y, probs))
    moved, _ = gate_loss(2, 0.0, g, route_weight=1.0)(gate, (h, y, probs))
    stayed, _ = gate_loss(2, 0.0, g, route_weight=1.0, own=0, stay_margin=0.2)(gate, (h, y, probs))
    log_w = torch.log_softmax(torch.tensor([2.0, 0.0]), 0)
    assert moved.item() - plain.item() == pytest.approx(-log_w[1].item(), rel=1e-6)  # CE toward expert 1
    assert stayed.item() - plain.item() == pytest.approx(-log_w[0].item(), rel=1e-6)  # CE toward own expert 0


def test_gate_loss_adds_the_weighted_routing_cross_entropy():
    gate = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    h = torch.tensor([[2.0, 0.0]])  # logits (2, 0)
    y = torch.tensor([1])
    probs = torch.tensor([[[0.5, 0.5], [0.1, 0.9]]])  # expert 1 is the target
    g = torch.Generator().manual_seed(0)
    plain, _ = gate_loss(2, 0.0, g)(gate, (h, y, probs))
    routed, _ = gate_loss(2, 0.0, g, route_weight=0.5)(gate, (h, y, probs))
    w = torch.softmax(torch.tensor([2.0, 0.0]), 0)
    assert plain.item() == pytest.approx(-math.log(w[0] * 0.5 + w[1] * 0.9), rel=1e-6)
    ce = -math.log(w[1].item())  # cross entropy toward expert 1
    assert routed.item() - plain.item() == pytest.approx(0.5 * ce, rel=1e-6)


def test_routing_log_prior_counts_targets_with_smoothing():
    # targets: expert 1 (most confident on label 1), expert 0, expert 0 -> counts [2, 1, 0] + 1
    probs = torch.tensor([
        [[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]],
        [[0.7, 0.3], [0.6, 0.4], [0.5, 0.5]],
        [[0.7, 0.3], [0.6, 0.4], [0.5, 0.5]],
    ])
    prior = routing_log_prior(probs, torch.tensor([1, 0, 0]))
    assert prior.exp().tolist() == pytest.approx([3 / 6, 2 / 6, 1 / 6])


def test_gate_prior_is_a_fixed_offset_on_the_logits():
    gate = Gate(4, 8, 3)
    h = torch.randn(5, 4)
    plain = gate(h)
    gate.log_prior.copy_(torch.tensor([0.0, -1.0, 2.0]))
    assert torch.allclose(gate(h) - plain, torch.tensor([0.0, -1.0, 2.0]).expand(5, 3))
    assert "log_prior" not in dict(gate.named_parameters())  # never trained
