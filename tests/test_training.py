"""The shared training loop, optimizers, metrics, augmentation and records."""

import math

import pytest
import torch

from nmoe_flwr.algorithms.models import MLP, Gate
from nmoe_flwr.algorithms.training import (
    Runtime,
    ce_loss,
    classification_metrics,
    cosine,
    fit,
    make_optimizers,
    normalize_gradients,
)
from nmoe_flwr.data.augment import random_crop_flip
from nmoe_flwr.records import bank_from_record, bank_to_record, from_record, to_record

CPU = Runtime(torch.device("cpu"))


def test_metrics_by_hand():
    labels = torch.tensor([0, 0, 0, 1, 2])
    pred = torch.tensor([0, 0, 1, 1, 0])
    m = classification_metrics(pred, labels, num_classes=4)
    # class 0: TP 2, FP 1, FN 1 -> 4/6; class 1: TP 1, FP 1 -> 2/3; class 2: FN 1 -> 0; class 3 absent.
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["macro-f1"] == pytest.approx((4 / 6 + 2 / 3 + 0) / 3)


def test_always_predicting_the_dominant_class_has_high_accuracy_low_macro_f1():
    labels = torch.tensor([0] * 90 + list(range(1, 10)) + [1])
    m = classification_metrics(torch.zeros(100, dtype=torch.long), labels, 10)
    assert m["accuracy"] == pytest.approx(0.9)
    assert m["macro-f1"] < 0.1


def test_normalize_gradients_gives_unit_norm_per_tensor():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    normalize_gradients([p])
    assert torch.allclose(p.grad, torch.tensor([0.6, 0.8, 0.0]))


def test_muon_takes_matrices_adamw_the_rest():
    gate = Gate(8, 16, 4)
    muon, adamw = make_optimizers(gate, "muon", 1e-3)
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert all(p.dim() == 2 for g in muon.param_groups for p in g["params"])
    assert all(p.dim() == 1 for g in adamw.param_groups for p in g["params"])


def test_cosine_schedule_endpoints():
    assert cosine(0.0) == 1.0 and cosine(1.0) == pytest.approx(0.0) and cosine(0.5) == pytest.approx(0.5)


@pytest.mark.parametrize("kind", ["sgd", "adamw", "muon"])
def test_fit_learns_a_separable_problem(kind):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    model = MLP(8, 16, 2)
    opts = make_optimizers(model, kind, 0.05 if kind == "sgd" else 1e-2)
    stats = fit(model, ce_loss, (x, y), epochs=20, batch_size=32, optimizers=opts, runtime=CPU,
                generator=torch.Generator().manual_seed(1), lr_multiplier=cosine, grad_norm=kind == "muon")
    assert stats.num_examples == 256 and math.isfinite(stats.loss)
    model.eval()
    assert (model(x).argmax(1) == y).float().mean() > 0.95
    assert all(gr["lr"] == pytest.approx(opts[0].defaults["lr"]) for gr in opts[0].param_groups)


def test_fit_is_deterministic_for_a_seed():
    x, y = torch.randn(64, 4, generator=torch.Generator().manual_seed(0)), torch.arange(64) % 2

    def run():
        torch.manual_seed(0)
        m = MLP(4, 8, 2)
        fit(m, ce_loss, (x, y), epochs=2, batch_size=16, optimizers=make_optimizers(m, "sgd", 0.1),
            runtime=CPU, generator=torch.Generator().manual_seed(5))
        return m.state_dict()

    a, b = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_crop_flip_keeps_shape_dtype_and_flips_exactly():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    out = random_crop_flip(x, 0, torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == x.shape
    for i in range(2):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))
    shifted = random_crop_flip(x, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape


def test_records_round_trip_and_cast_half_precision():
    state = {"a": torch.ones(2, dtype=torch.bfloat16), "b": torch.arange(3)}
    back = from_record(to_record(state))
    assert back["a"].dtype == torch.float32 and torch.equal(back["b"], state["b"])
    bank = {1: {"w": torch.ones(2)}, 0: {"w": torch.zeros(2)}}
    restored = bank_from_record(bank_to_record(bank))
    assert list(restored) == [0, 1] and torch.equal(restored[1]["w"], torch.ones(2))


def test_torch_threads_sets_and_restores_the_count():
    from nmoe_flwr.algorithms.training import torch_threads

    before = torch.get_num_threads()
    other = 2 if before == 1 else 1
    with torch_threads(other):
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(other):
        raise RuntimeError("restored on errors too")
    assert torch.get_num_threads() == before


def test_packed_records_round_trip_and_average_like_plain_ones():
    """records.pack: a few flat arrays per message instead of one per tensor (issue 13.1), with
    FedAvg on packed records equal, bit for bit, to FedAvg on plain ones."""
    import numpy as np
    from flwr.app import ConfigRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from nmoe_flwr.algorithms.fedce import new_classifier
    from nmoe_flwr.data import dataset_spec
    from nmoe_flwr.records import is_packed, pack, unpack

    stats = dataset_spec("fashion-mnist").pixel_stats
    states = []
    for seed in range(3):
        model = new_classifier(stats, 10, 16, seed=seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
        state = model.state_dict()
        state["extractor.bn1.num_batches_tracked"] = torch.tensor(seed + 1)
        states.append(state)
    packed = pack(states[0])
    assert is_packed(packed) and not is_packed(states[0])
    assert sorted(packed) == ["extractor.@counters", "extractor.@running_stats", "extractor.@weights",
                              "head.@weights"]
    back = unpack(packed, states[1])  # any state of the same model is a template
    assert list(back) == list(states[0])
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in states[0].items())

    def objects(state):
        return len(get_all_nested_objects(RecordDict({"arrays": to_record(state), "config": ConfigRecord()})))

    assert objects(packed) <= 12 and 5 * objects(packed) < objects(states[0])  # 207 vs 11 for a trained one

    def fedavg(records):
        replies = [RecordDict({"arrays": r, "metrics": MetricRecord({"num-examples": n})})
                   for r, n in zip(records, (10, 30, 7), strict=True)]
        return {k: torch.from_numpy(np.asarray(v.numpy())) for k, v in aggregate_arrayrecords(replies, "num-examples").items()}

    # Averages come back float (int64 counters too); the strategies cast them to the sent dtypes (cast_like).
    plain = {k: v.to(states[0][k].dtype) for k, v in fedavg([to_record(s) for s in states]).items()}
    averaged = {g: v.to(packed[g].dtype) for g, v in fedavg([to_record(pack(s)) for s in states]).items()}
    via_packed = unpack(averaged, states[0])
    assert list(via_packed) == list(plain)
    for k, v in plain.items():
        assert via_packed[k].dtype == v.dtype and torch.equal(via_packed[k], v), k


def test_unpack_refuses_what_does_not_fit_the_model():
    from nmoe_flwr.records import pack, unpack

    model = MLP(4, 8, 3)
    packed = pack(model.state_dict())
    short = {k: v[:-1] for k, v in packed.items()}
    with pytest.raises(ValueError, match="has 210 values; the model needs more"):
        unpack(short, model.state_dict())
    with pytest.raises(ValueError, match="do not fit"):
        unpack({**packed, "extra.@weights": torch.zeros(3)}, model.state_dict())
