"""Cross-fitted answers of a client's own expert
(:func:`nmoe_flwr.algorithms.experts.out_of_fold_probs`)."""

import torch
from torch import nn

from nmoe_flwr.algorithms.experts import out_of_fold_probs, train_expert
from nmoe_flwr.algorithms.models import MLP
from nmoe_flwr.algorithms.seeding import seeded
from nmoe_flwr.algorithms.training import Runtime
from nmoe_flwr.config import parse_run_config

N, D, C, K = 40, 8, 4, 5
CPU = Runtime(torch.device("cpu"))


def _cfg(folds: int = K, epochs: int = 150):
    return parse_run_config({
        "gate-oof-folds": folds, "expert-epochs": epochs, "expert-lr": 0.03, "weight-decay": 0.0,
        "batch-size": 8, "mlp-hidden": 32,
    })


def _noise_data(n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    """Random latents whose column 0 is the sample's index; labels are pure noise,
    so only memorisation can get a training sample right."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, D, generator=g)
    h[:, 0] = torch.arange(n, dtype=torch.float32)
    y = torch.randint(0, C, (n,), generator=g)
    return h, y


class Recording(nn.Module):
    """An expert that remembers which samples it saw in training and in evaluation."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        with seeded(seed):
            self.mlp = MLP(D, 32, C)
        self.trained_on: set[int] = set()
        self.answered: dict[int, torch.Tensor] = {}

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.mlp(h)
        ids = h[:, 0].round().long().tolist()
        if self.training:
            self.trained_on.update(ids)
        else:
            for i, row in zip(ids, out.detach().softmax(-1)):
                self.answered[i] = row
        return out


def _recording_factory():
    made: list[Recording] = []

    def make() -> nn.Module:
        made.append(Recording(seed=123))  # same init for every fold, like the client's make_expert
        return made[-1]

    return make, made


def test_every_row_is_a_probability_vector_from_the_fold_expert_that_did_not_see_it():
    """K experts are made; their held-out folds partition the samples (sizes N/K); row i equals the
    answer of the one expert that answered i, and that expert never trained on i."""
    h, y = _noise_data()
    make, made = _recording_factory()
    probs = out_of_fold_probs(make, h, y, _cfg(epochs=2), CPU, seed=7)
    assert probs.shape == (N, C)
    assert (probs >= 0).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(N), atol=1e-6, rtol=0)
    assert len(made) == K
    held = [set(e.answered) for e in made]
    assert sorted(len(s) for s in held) == [N // K] * K
    assert set().union(*held) == set(range(N)) and sum(map(len, held)) == N  # a partition
    for expert, fold in zip(made, held):
        assert expert.trained_on.isdisjoint(fold)
        assert expert.trained_on == set(range(N)) - fold  # batches of 8 over 32 samples: every one seen
        for i in fold:
            torch.testing.assert_close(probs[i], expert.answered[i], atol=1e-6, rtol=0)


def test_out_of_fold_answers_are_honest_where_in_sample_ones_are_memorised():
    """On noise labels an expert fitted on all samples is confident on the true label;
    the cross-fitted answers are near chance (1/C)."""
    h, y = _noise_data()

    def make() -> nn.Module:
        with seeded(123):
            return MLP(D, 32, C)

    cfg = _cfg()
    full = make()
    train_expert(full, h, y, cfg, CPU, seed=1)
    full.eval()
    with torch.no_grad():
        in_sample = full(h).softmax(-1)[torch.arange(N), y]
    oof = out_of_fold_probs(make, h, y, cfg, CPU, seed=7)[torch.arange(N), y]
    assert in_sample.mean() > 0.9, in_sample.mean()
    assert oof.mean() < 0.45, oof.mean()
    assert (in_sample > oof).float().mean() > 0.9


def test_out_of_fold_probs_is_deterministic_for_a_seed():
    """Same seed: identical answers; another seed: another fold split, other answers."""
    h, y = _noise_data()

    def make() -> nn.Module:
        with seeded(123):
            return MLP(D, 32, C)

    cfg = _cfg(epochs=3)
    a = out_of_fold_probs(make, h, y, cfg, CPU, seed=7)
    b = out_of_fold_probs(make, h, y, cfg, CPU, seed=7)
    c = out_of_fold_probs(make, h, y, cfg, CPU, seed=8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_k_folds_are_made_even_when_n_is_not_a_multiple_of_k():
    """With N=9 and gate-oof-folds=4 there are 4 fold experts (held-out sizes 3, 2, 2, 2)."""
    h, y = _noise_data(9)
    make, made = _recording_factory()
    out_of_fold_probs(make, h, y, _cfg(folds=4, epochs=1), CPU, seed=7)
    assert sorted(len(e.answered) for e in made) == [2, 2, 2, 3]
