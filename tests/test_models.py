"""Shapes, parameter counts and naming of the NMoE models; router and combine."""

import math

import pytest
import torch

from nmoe_flwr.algorithms.models import (
    MLP,
    CentralizedMoE,
    Classifier,
    Gate,
    ResNet20,
    mixture_nll,
    mixture_probs,
    nmoe_combine,
    num_parameters,
    route,
)
from nmoe_flwr.data.registry import PixelStats


@pytest.mark.parametrize(("channels", "size", "params"), [(3, 32, 269_072), (1, 28, 268_784)])
def test_resnet20_shape_and_parameter_count(channels, size, params):
    model = ResNet20(PixelStats.neutral(channels))
    # The CIFAR ResNet20 of He et al. has 0.27 M parameters (with its 650-parameter fc layer).
    assert num_parameters(model) == params
    assert abs(params + 650 - 270_000) / 270_000 < 0.01
    x = torch.randint(0, 256, (4, channels, size, size), dtype=torch.uint8)
    assert model(x).shape == (4, 64)


def test_mlp_has_four_linear_layers():
    mlp = MLP(64, 128, 10)
    linears = [m for m in mlp.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 128), (128, 128), (128, 128), (128, 10)]
    assert num_parameters(mlp) == 64 * 128 + 128 + 2 * (128 * 128 + 128) + 128 * 10 + 10


def test_classifier_and_gate_key_prefixes():
    keys = Classifier(PixelStats.neutral(1), 10, 32).state_dict().keys()
    assert {k.split(".")[0] for k in keys} == {"extractor", "head"}
    gate_keys = set(Gate(64, 32, 5).state_dict())
    assert {k for k in gate_keys if k.startswith("decision.")} == {"decision.weight", "decision.bias"}
    assert sum(k.startswith("shared.") for k in gate_keys) == 6  # three shared linear layers
    assert Gate(64, 32, 5)(torch.zeros(3, 64)).shape == (3, 5)


def test_normalisation_constants_do_not_travel():
    assert not {"mean", "std"} & set(ResNet20(PixelStats.neutral(3)).state_dict())
    assert {"mean", "std"} <= {name for name, _ in ResNet20(PixelStats.neutral(3)).named_buffers()}


def test_route_top_k_by_hand():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.0, -1.0, 5.0]])
    weights, index = route(logits, k=2)
    assert index.tolist() == [[1, 2], [2, 0]]
    e = math.exp(1.0)
    expected = torch.tensor([[e / (e + 1), 1 / (e + 1)], [math.exp(5) / (math.exp(5) + 1), 1 / (math.exp(5) + 1)]])
    assert torch.allclose(weights, expected)
    w1, i1 = route(logits, k=1)
    assert i1.tolist() == [[1], [2]] and torch.equal(w1, torch.ones(2, 1))


def test_route_noise_is_seeded_and_rejects_bad_k():
    logits = torch.zeros(8, 4)
    a = route(logits, 1, 1.0, torch.Generator().manual_seed(3))[1]
    b = route(logits, 1, 1.0, torch.Generator().manual_seed(3))[1]
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="top-k"):
        route(logits, 5)


def test_mixture_probs_by_hand():
    # Two experts, two classes, one sample; gate keeps both with weights 0.25/0.75.
    probs = torch.tensor([[[0.9, 0.1], [0.2, 0.8]]])
    mix = mixture_probs(torch.tensor([[0.25, 0.75]]), torch.tensor([[0, 1]]), probs)
    assert torch.allclose(mix, torch.tensor([[0.25 * 0.9 + 0.75 * 0.2, 0.25 * 0.1 + 0.75 * 0.8]]))
    assert torch.isclose(mixture_nll(mix, torch.tensor([1])), -torch.log(torch.tensor(0.625)))


class _Counting(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits, self.rows = torch.tensor(logits), 0

    def forward(self, h):
        self.rows += h.shape[0]
        return self.logits.expand(h.shape[0], -1)


def test_nmoe_combine_runs_only_picked_experts_and_matches_dense():
    experts = [_Counting([2.0, 0.0]), _Counting([0.0, 2.0]), _Counting([1.0, 1.0])]
    h = torch.zeros(3, 4)
    weights = torch.tensor([[1.0], [1.0], [1.0]])
    index = torch.tensor([[0], [0], [2]])
    out = nmoe_combine(h, weights, index, experts)
    assert [e.rows for e in experts] == [2, 0, 1]  # expert 1 was never asked
    dense = torch.stack([e.logits.expand(3, -1) for e in experts], 1).softmax(-1)
    assert torch.allclose(out, mixture_probs(weights, index, dense))
    assert torch.allclose(out[2], torch.tensor([0.5, 0.5]))


def test_centralized_moe_train_and_eval_outputs_are_distributions():
    model = CentralizedMoE(PixelStats.neutral(1), 10, 3, 16)
    x = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    out = model(x, k=2, noise_std=1.0, generator=torch.Generator().manual_seed(0))
    assert out.shape == (5, 10) and torch.allclose(out.sum(1), torch.ones(5))
    model.eval()
    assert torch.allclose(model(x, k=1).sum(1), torch.ones(5))


def test_norm_free_resnet20_parameter_count_and_keys():
    """Fixup ResNet20: the BatchNorm ResNet20 less its 1376 BN weights, plus 46 scalars (stem bias, 5 per block)."""
    model = ResNet20(PixelStats.neutral(1), norm="none")
    assert num_parameters(model) == 268_784 - 2 * (16 + 3 * 2 * (16 + 32 + 64)) + 1 + 9 * 5 == 267_454
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert not [name for name, _ in model.named_buffers() if name not in ("mean", "std")]  # no statistics
    assert ResNet20.norm_of(model.state_dict()) == "none"
    assert ResNet20.norm_of(ResNet20(PixelStats.neutral(1)).state_dict()) == "batch"
    with pytest.raises(ValueError, match="valid: batch, none"):
        ResNet20(PixelStats.neutral(1), norm="group")


def test_norm_free_resnet20_starts_as_its_stem_and_shortcuts():
    """Fixup's init zeroes every residual branch, so at init the extractor is relu(stem conv) carried through the
    option-A shortcuts (subsample by 4, channels zero-padded 16 -> 64), then averaged."""
    torch.manual_seed(0)
    model = ResNet20(PixelStats.neutral(1), norm="none")
    x = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    stem = torch.relu(model.conv((x.float() - model.mean) / model.std))[:, :, ::4, ::4]  # two stride-2 stages
    expected = torch.nn.functional.pad(stem, (0, 0, 0, 0, 24, 24)).mean(dim=(2, 3))  # 16 -> 32 -> 64 channels
    torch.testing.assert_close(model(x), expected)


def test_norm_free_embeddings_depend_on_their_own_sample_only_in_training_mode():
    model = ResNet20(PixelStats.neutral(1), norm="none").train()
    x = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    other = x.clone()
    other[1:] = 255 - other[1:]
    torch.testing.assert_close(model(x)[0], model(other)[0])
    bn = ResNet20(PixelStats.neutral(1)).train()  # with BatchNorm in training mode they do not
    assert not torch.allclose(bn(x)[0], bn(other)[0])


def test_a_saved_extractor_of_the_other_norm_is_refused_by_name(tmp_path):
    from nmoe_flwr.config import ConfigError
    from nmoe_flwr.pipelines.extractor import load_extractor

    path = tmp_path / "extractor.pt"
    torch.save(ResNet20(PixelStats.neutral(1)).state_dict(), path)
    assert set(load_extractor(str(path), "batch")) == set(ResNet20(PixelStats.neutral(1)).state_dict())
    with pytest.raises(ConfigError, match="extractor-norm = 'batch', this run has 'none'"):
        load_extractor(str(path), "none")
