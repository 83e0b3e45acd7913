"""The weighted kNN probe (:func:`nmoe_flwr.algorithms.probes.knn_metrics`) on a hand-built case.

Latents lie on circles around the origin (radii differ, so only the angle may
matter: cosine similarity), labelled by quadrant. Angles in degrees::

    train: 20 -> 0, 70 -> 0, 110 -> 1, 160 -> 1, 250 -> 2, 290 -> 3, 340 -> 3
    test : 30 (0), 95 (1), 85 (0), 195 (2), 300 (3), 255 (2)

Nearest training angles of each test point, closest first:

    30 : 20 (0), 70 (0), 340 (3)        -> 0 by any vote
    95 : 110 (1), 70 (0), 160 (1)       -> 1
    85 : 70 (0), 110 (1), 20 (0)        -> 0
    195: 160 (1), 250 (2), 110 (1)      -> 1 (wrong)
    300: 290 (3), 340 (3), 250 (2)      -> 3
    255: 250 (2), 290 (3), 340 (3)      -> k=1: 2; k=3 majority: 3; k=3 weighted
                                           exp(cos 5 / 0.07) = e^14.23 > e^11.70 + e^1.25: 2
"""

import math

import pytest
import torch

from nmoe_flwr.algorithms.probes import (
    class_balanced,
    knn_metrics,
    prior_adjusted,
    probe_features,
    router_ceiling,
)
from nmoe_flwr.algorithms.training import Runtime

TRAIN = [(20, 0, 1.0), (70, 0, 3.0), (110, 1, 0.5), (160, 1, 2.0), (250, 2, 1.5), (290, 3, 0.25), (340, 3, 4.0)]
TEST = [(30, 0, 2.0), (95, 1, 1.0), (85, 0, 0.3), (195, 2, 5.0), (300, 3, 1.0), (255, 2, 0.7)]


def _points(rows):
    h = torch.tensor([[r * math.cos(math.radians(a)), r * math.sin(math.radians(a))] for a, _, r in rows])
    return h, torch.tensor([label for _, label, _ in rows])


def _knn(k, temperature=0.07):
    (a, ya), (b, yb) = _points(TRAIN), _points(TEST)
    return knn_metrics(a, ya, b, yb, num_classes=4, k=k, temperature=temperature)


def test_k1_nearest_angle_decides():
    """k=1: predictions [0, 1, 0, 1, 3, 2]: accuracy 5/6; F1 per class 1, 2/3, 2/3, 1: macro 5/6."""
    m = _knn(1)
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert m["macro-f1"] == pytest.approx(5 / 6)


def test_k3_temperature_weighted_vote_beats_plain_majority():
    """k=3, T=0.07: the close neighbour of 255 deg outvotes two far ones: same as k=1 (5/6, 5/6)."""
    m = _knn(3)
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert m["macro-f1"] == pytest.approx(5 / 6)


def test_k3_with_a_flat_temperature_is_the_plain_majority():
    """k=3, T=100 (all weights ~1): 255 deg goes to class 3: predictions [0, 1, 0, 1, 3, 3],
    accuracy 4/6; F1 per class 1, 2/3, 0, 2/3: macro 7/12."""
    m = _knn(3, temperature=100.0)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["macro-f1"] == pytest.approx(7 / 12)


def test_k_larger_than_the_memory_uses_every_training_point():
    """k=100 > 7 training points: all vote, the nearest still dominates at T=0.07 (same as k=1)."""
    m = _knn(100)
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert m["macro-f1"] == pytest.approx(5 / 6)


def test_only_the_direction_of_a_latent_matters():
    """Rescaling every latent by a different positive factor changes nothing (cosine similarity)."""
    (a, ya), (b, yb) = _points(TRAIN), _points(TEST)
    g = torch.Generator().manual_seed(0)
    a2 = a * (0.1 + 10 * torch.rand(a.shape[0], 1, generator=g))
    b2 = b * (0.1 + 10 * torch.rand(b.shape[0], 1, generator=g))
    for k in (1, 3):
        assert knn_metrics(a2, ya, b2, yb, 4, k) == knn_metrics(a, ya, b, yb, 4, k)


CPU = Runtime(torch.device("cpu"))


def test_prior_adjustment_by_hand():
    """p_i(y|h) ∝ p(y|h) pi_i(y) / pi(y): a flat posterior takes the client's prior."""
    probs = torch.tensor([[0.5, 0.5], [0.8, 0.2]])
    out = prior_adjusted(probs, torch.tensor([0.9, 0.1]), torch.tensor([0.5, 0.5]))
    assert out[0].tolist() == pytest.approx([0.9, 0.1])
    assert out[1].tolist() == pytest.approx([0.72 / 0.74, 0.02 / 0.74])


def test_class_balanced_cuts_every_class_to_the_rarest():
    labels = torch.tensor([0, 0, 0, 1, 2, 2, 1, 0])
    idx = class_balanced(labels, 3, seed=0)
    assert torch.bincount(labels[idx], minlength=3).tolist() == [2, 2, 2]
    assert idx.tolist() == sorted(set(idx.tolist()))


def _blobs(n_per_class: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    centers = torch.eye(4)[:3] * 6.0
    y = torch.arange(3).repeat_interleave(n_per_class)
    return centers[y] + torch.randn(y.numel(), 4, generator=g), y


def test_probes_separate_separable_features_and_fail_on_noise():
    """On well-separated blobs every probe is near perfect; on pure noise none beats chance by much."""
    h, y = _blobs(60, 0)
    ht, yt = _blobs(30, 1)
    good = probe_features(h, y, ht, yt, 3, CPU, k=5, hidden=16, seed=0, steps=150)
    assert set(good) == {f"{p}-{t}-{m}" for p in ("knn", "linear", "mlp") for t in ("pooled", "balanced") for m in ("accuracy", "macro-f1")}
    assert min(v for k, v in good.items() if k.endswith("accuracy")) > 0.95
    g = torch.Generator().manual_seed(2)
    noise = probe_features(torch.randn(180, 4, generator=g), y, torch.randn(90, 4, generator=g), yt, 3, CPU, k=5, hidden=16, seed=0, steps=150)
    assert max(v for k, v in noise.items() if k.endswith("accuracy")) < 0.6


def test_router_ceiling_uses_each_clients_prior():
    """Features that carry no class information: the ceiling predicts each client's dominant class."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(2).repeat(100)
    h = torch.randn(200, 3, generator=g)
    tests = [(torch.randn(50, 3, generator=g), torch.zeros(50, dtype=torch.long)),
             (torch.randn(50, 3, generator=g), torch.ones(50, dtype=torch.long))]
    priors = [torch.tensor([0.9, 0.1]), torch.tensor([0.1, 0.9])]
    out = router_ceiling(h, y, tests, priors, 2, CPU, hidden=0, seed=0, steps=150)  # linear: cannot memorise noise
    assert [o["accuracy"] for o in out] == [1.0, 1.0]
