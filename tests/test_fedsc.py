"""FedSC: R_ext by hand, the spectral loss by hand, noise scale, accounting, the strategy's two phases."""

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from nmoe_flwr.algorithms.fedsc import alpha_at, clip_norm, correlation, spectral_loss
from nmoe_flwr.algorithms.privacy import (
    GaussianMechanism,
    correlation_sensitivity,
    privatize,
)
from nmoe_flwr.constants import (
    ALPHA,
    CORRELATION,
    CORRELATION_KEY,
    METRICS,
    NUM_EXAMPLES,
    R_EXT_KEY,
)
from nmoe_flwr.data.augment import two_views
from nmoe_flwr.strategies import CorrelationEntry, FedSC, external_correlation


def test_external_correlation_by_hand():
    entries = {
        1: CorrelationEntry(np.array([[1.0, 0.0], [0.0, 0.0]]), 100.0, 1),
        2: CorrelationEntry(np.array([[0.0, 0.0], [0.0, 2.0]]), 300.0, 1),
        3: CorrelationEntry(np.array([[4.0, 4.0], [4.0, 4.0]]), 100.0, 1),
    }
    # client 1 sees (300 R_2 + 100 R_3) / 400
    np.testing.assert_allclose(external_correlation(entries, 1), [[1.0, 1.0], [1.0, 2.5]])
    # client 2 sees (100 R_1 + 100 R_3) / 200
    np.testing.assert_allclose(external_correlation(entries, 2), [[2.5, 2.0], [2.0, 2.0]])
    assert external_correlation({1: entries[1]}, 1) is None


def test_clip_norm_bounds_rows_at_sqrt_mu():
    z = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    out = clip_norm(z, mu=4.0)
    assert torch.allclose(out, torch.tensor([[1.2, 1.6], [0.3, 0.4]]))


def test_spectral_loss_by_hand():
    z0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z1 = torch.tensor([[1.0, 0.0], [0.0, 0.5]])
    # positive: -2 * mean(<z0_b, z1_b>) = -2 * (1 + 0.5) / 2 = -1.5
    # R = Z^T Z / 4 with Z = [z0; z1] = diag(2, 1.25) / 4 = diag(0.5, 0.3125)
    r_ext = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    local = -1.5 + (0.5**2 + 0.3125**2)
    assert spectral_loss(z0, z1, 1.0, r_ext, mu=4.0).item() == pytest.approx(local)
    alpha = 0.25
    mixed = -1.5 + alpha * (0.5**2 + 0.3125**2) + 2 * (1 - alpha) * (0.5 * 1.0 + 0.3125 * 2.0)
    assert spectral_loss(z0, z1, alpha, r_ext, mu=4.0).item() == pytest.approx(mixed)


def test_alpha_one_is_the_local_spectral_loss():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    r_ext = torch.randn(4, 4, generator=g)
    assert torch.equal(spectral_loss(z0, z1, 1.0, r_ext, 5.0), spectral_loss(z0, z1, 1.0, None, 5.0))


def test_alpha_schedule_is_linear_from_start_to_end():
    assert [alpha_at(r, 5, 1.0, 0.2) for r in (1, 3, 5)] == pytest.approx([1.0, 0.6, 0.2])


def test_noise_has_the_expected_standard_deviation():
    mech = GaussianMechanism(noise_multiplier=2.0, delta=1e-5)
    std = mech.noise_std(mu=4.0, num_samples=1000)
    assert std == pytest.approx(2.0 * math.sqrt(2) * 4.0 / 1000) and correlation_sensitivity(4.0, 1000) == pytest.approx(0.004 * math.sqrt(2))
    r = correlation(torch.randn(1000, 128, generator=torch.Generator().manual_seed(0)))
    noisy = privatize(r, std, torch.Generator().manual_seed(1))
    measured = (noisy - r).std().item()
    assert measured == pytest.approx(std, rel=0.02)  # 16384 entries: std estimate within ~1 %
    assert torch.equal(privatize(r, 0.0, torch.Generator()), r)


def test_budget_to_noise_and_back_uses_the_accountant():
    mech = GaussianMechanism.for_budget(epsilon=8.0, delta=1e-5, releases=30)
    assert mech.noise_multiplier > 1.0
    assert mech.epsilon(30) == pytest.approx(8.0, rel=0.02)
    assert mech.epsilon(10) < mech.epsilon(30)
    off = GaussianMechanism.for_budget(math.inf, 1e-5, 30)
    assert off.noise_multiplier == 0.0 and math.isinf(off.epsilon(30))


def test_two_views_are_batched_float_and_differ():
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    v0, v1 = two_views(x, torch.Generator().manual_seed(0))
    assert v0.shape == x.shape and v0.dtype == torch.float32 and not torch.equal(v0, v1)
    assert 0.0 <= v0.min() and v0.max() <= 255.0


def test_intensity_jitter_by_hand():
    """Brightness b then contrast c around the image mean: (b x - mean(b x)) c + mean(b x), clamped."""
    from nmoe_flwr.data.augment import intensity_jitter

    x = torch.tensor([[[[10.0, 30.0], [50.0, 250.0]]]])
    g = torch.Generator().manual_seed(0)
    u = torch.rand(1, 3, generator=torch.Generator().manual_seed(0))
    b, c = 1 + 0.4 * (2 * u[0, 0] - 1), 1 + 0.4 * (2 * u[0, 1] - 1)
    assert u[0, 2] < 0.8  # this draw jitters
    bx = x * b
    expected = ((bx - bx.mean()) * c + bx.mean()).clamp(0, 255)
    torch.testing.assert_close(intensity_jitter(x, g), expected)
    gray = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    plain = two_views(gray, torch.Generator().manual_seed(1))
    jittered = two_views(gray, torch.Generator().manual_seed(1), gray_jitter=True)
    assert not torch.equal(plain[0], jittered[0]) and 0 <= jittered[0].min() and jittered[0].max() <= 255


class _FakeGrid:
    """Answers FedSC's correlation queries like clients would (fixed matrices)."""

    def __init__(self, matrices, sizes):
        self.matrices, self.sizes, self.sent = matrices, sizes, []

    def get_node_ids(self):
        return list(self.matrices)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for m in messages:
            self.sent.append(m)
            node = m.metadata.dst_node_id
            content = RecordDict({
                CORRELATION: ArrayRecord({CORRELATION_KEY: Array(np.asarray(self.matrices[node], dtype=np.float32))}),
                METRICS: MetricRecord({NUM_EXAMPLES: self.sizes[node]}),
            })
            replies.append(Message(content, reply_to=m))  # src_node_id = the query's destination
        return replies


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("stale", ["reuse", "drop"])
def test_strategy_sends_each_node_the_others_weighted_matrix(stale):
    grid = _FakeGrid({1: [[1.0]], 2: [[3.0]], 3: [[9.0]]}, {1: 100, 2: 100, 3: 200})
    strategy = FedSC(alpha=lambda r: 0.5, stale_matrices=stale, min_available_nodes=3)
    msgs = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    assert [m.metadata.message_type for m in grid.sent] == ["query.correlation"] * 3
    got = {m.metadata.dst_node_id: m.content[CORRELATION][R_EXT_KEY].numpy()[0, 0] for m in msgs}
    assert got == pytest.approx({1: (100 * 3 + 200 * 9) / 300, 2: (100 * 1 + 200 * 9) / 300, 3: 2.0})
    assert all(m.metadata.message_type == "train.fedsc" and m.content["config"][ALPHA] == 0.5 for m in msgs)
    assert strategy.releases == {1: 1, 2: 1, 3: 1}

    # Round 2 with partial participation: only nodes 1 and 2 are sampled.
    strategy.fraction_train, strategy.min_train_nodes = 2 / 3, 2
    grid.matrices = {1: [[5.0]], 2: [[7.0]], 3: [[9.0]]}
    msgs = list(strategy.configure_train(2, ArrayRecord(), ConfigRecord(), grid))  # any 2 of the 3
    sampled = {m.metadata.dst_node_id for m in msgs}
    assert len(sampled) == 2
    (absent,) = {1, 2, 3} - sampled
    for m in msgs:
        node = m.metadata.dst_node_id
        (other,) = sampled - {node}
        value = m.content[CORRELATION][R_EXT_KEY].numpy()[0, 0]
        fresh = grid.matrices[other][0][0]
        if stale == "drop":
            assert value == pytest.approx(fresh)  # the absent node's round-1 matrix is not used
        else:  # its round-1 matrix is reused with its weight
            old = {1: 1.0, 2: 3.0, 3: 9.0}[absent]
            w_other, w_absent = grid.sizes[other], grid.sizes[absent]
            assert value == pytest.approx((w_other * fresh + w_absent * old) / (w_other + w_absent))


def test_correlation_sensitivity_is_a_tight_bound():
    """Replacing one clipped sample moves R by at most sqrt(2) mu / n, and orthogonal samples reach it."""
    mu, n, d = 4.0, 50, 6
    g = torch.Generator().manual_seed(0)
    bound = correlation_sensitivity(mu, n)
    base = clip_norm(torch.randn(n, d, generator=g, dtype=torch.float64), mu)
    worst = 0.0
    for _ in range(200):
        other = base.clone()
        other[0] = clip_norm(torch.randn(1, d, generator=g, dtype=torch.float64) * 5, mu)[0]
        worst = max(worst, torch.linalg.norm(correlation(other) - correlation(base)).item())
    assert worst <= bound + 1e-12
    a = torch.zeros(n, d, dtype=torch.float64)
    b = a.clone()
    a[0, 0] = b[0, 1] = math.sqrt(mu)  # orthogonal, on the clipping sphere
    assert torch.linalg.norm(correlation(a) - correlation(b)).item() == pytest.approx(bound, rel=1e-12)


def test_released_correlation_respects_the_sensitivity_bound():
    """R_i is computed with BatchNorm's running statistics (eval mode), so each sample's embedding depends on that
    sample alone and replacing one image moves R_i by at most sqrt(2) mu / n, the bound the DP noise is scaled to.
    With batch statistics (train mode) one image moves every embedding of its batch, and the bound breaks."""
    from nmoe_flwr.algorithms.fedsc import fedsc_correlation, new_ssl_model
    from nmoe_flwr.algorithms.training import resolve_runtime
    from nmoe_flwr.config import RunConfig
    from nmoe_flwr.data import pixel_stats_for

    cfg = RunConfig(fedsc_batch_size=8, fedsc_proj_dim=16, fedsc_corr_passes=1)
    runtime = resolve_runtime("cpu", "off")
    model = new_ssl_model(pixel_stats_for("fashion-mnist", "", 1), cfg.fedsc_proj_dim, seed=0)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 30, (32, 1, 28, 28), generator=g, dtype=torch.uint8)  # dim images
    other = x.clone()
    other[5] = 255  # and one bright one in the first batch: it shifts that batch's statistics
    bound = correlation_sensitivity(cfg.fedsc_mu, x.shape[0])
    moved = torch.linalg.norm(fedsc_correlation(model, other, cfg, runtime, 7) - fedsc_correlation(model, x, cfg, runtime, 7))
    assert 0.0 < moved.item() <= bound * (1 + 1e-4)

    def batch_stat_correlation(images: torch.Tensor) -> torch.Tensor:  # the same release, BatchNorm in train mode
        model.train()
        with torch.no_grad():
            z = clip_norm(model(images.float()), cfg.fedsc_mu).double()
        return z.T @ z / images.shape[0]

    moved_train = torch.linalg.norm(batch_stat_correlation(other) - batch_stat_correlation(x)).item()
    assert moved_train > bound


def test_norm_free_extractor_keeps_the_bound_with_the_loss_view_of_the_data():
    """Without BatchNorm (extractor-norm = "none") the embeddings the loss sees in training mode are per-sample, so
    the same release computed in training mode stays within sqrt(2) mu / n: no mismatch and no loss of privacy."""
    from nmoe_flwr.algorithms.fedsc import new_ssl_model
    from nmoe_flwr.data import pixel_stats_for

    mu, n = 4.0, 32
    model = new_ssl_model(pixel_stats_for("fashion-mnist", "", 1), 16, seed=0, norm="none").train()
    x = torch.randint(0, 30, (n, 1, 28, 28), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    other = x.clone()
    other[5] = 255

    def release(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = clip_norm(model(images.float()), mu).double()
        return z.T @ z / n

    moved = torch.linalg.norm(release(other) - release(x)).item()
    assert 0.0 < moved <= correlation_sensitivity(mu, n) * (1 + 1e-6)
