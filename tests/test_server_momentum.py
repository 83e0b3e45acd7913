"""FedAvgM's server step by hand (algorithms/server_momentum.py)."""

import numpy as np
import torch

from nmoe_flwr.algorithms.server_momentum import momentum_step, takes_momentum


def test_momentum_step_by_hand():
    v: dict = {}
    # prev 0 -> avg 1: the velocity starts as the update itself
    out = momentum_step({"w": torch.tensor([0.0])}, {"w": torch.tensor([1.0])}, v, 0.5)
    assert out["w"].item() == 1.0 and v["w"].item() == 1.0
    # prev 1 -> avg 2: v = 0.5 * 1 + 1 = 1.5, new = 1 + 1.5 = 2.5
    out = momentum_step({"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])}, v, 0.5)
    assert out["w"].item() == 2.5 and v["w"].item() == 1.5


def test_batchnorm_statistics_and_counters_take_no_momentum():
    prev = {"bn.running_var": np.array([1.0], np.float32), "bn.num_batches_tracked": np.array(3),
            "conv.weight": np.array([0.0], np.float32)}
    avg = {"bn.running_var": np.array([0.5], np.float32), "bn.num_batches_tracked": np.array(6),
           "conv.weight": np.array([1.0], np.float32)}
    v = {"conv.weight": np.array([1.0], np.float32), "bn.running_var": np.array([-9.0], np.float32)}
    out = momentum_step(prev, avg, v, 0.9)
    assert out["bn.running_var"][0] == 0.5 and out["bn.num_batches_tracked"] == 6  # the average, untouched
    assert out["conv.weight"][0] == np.float32(0.0 + 0.9 * 1.0 + 1.0)
    assert takes_momentum("head.w", torch.zeros(1)) and not takes_momentum("bn.running_mean", torch.zeros(1))
    assert not takes_momentum("n", torch.zeros(1, dtype=torch.int64))


def test_zero_momentum_is_fedavg():
    avg = {"w": torch.tensor([3.0])}
    assert momentum_step({"w": torch.tensor([0.0])}, avg, {}, 0.0) == avg
