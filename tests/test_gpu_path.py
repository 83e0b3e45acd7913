"""The CUDA path, covered on CPU (issue 13.3): device and autocast choice, mixed-precision training
with the same loop (bf16 autocast, fp16 with loss scaling), channels_last, and state dicts leaving
the device as plain fp32 CPU tensors. No GPU is needed; the GPU box runs the same code."""

import math

import pytest
import torch

from nmoe_flwr.algorithms import training
from nmoe_flwr.algorithms.fedce import new_classifier
from nmoe_flwr.algorithms.training import (
    Runtime,
    ce_loss,
    fit,
    make_optimizers,
    resolve_runtime,
)
from nmoe_flwr.data import dataset_spec
from nmoe_flwr.records import from_record, to_record


@pytest.mark.parametrize(
    ("cuda", "bf16", "device", "amp", "expected"),
    [
        (True, True, "auto", "auto", ("cuda", torch.bfloat16)),  # an H100/H200: bf16 autocast
        (True, False, "auto", "auto", ("cuda", torch.float16)),  # a V100 / Jetson without bf16: fp16 + scaling
        (True, True, "auto", "off", ("cuda", None)),
        (True, True, "cpu", "auto", ("cpu", None)),  # forced CPU never autocasts by default
        (False, False, "auto", "auto", ("cpu", None)),
        (False, False, "auto", "bf16", ("cpu", torch.bfloat16)),  # asked for explicitly
    ],
)
def test_device_and_autocast_choice(monkeypatch, cuda, bf16, device, amp, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    rt = resolve_runtime(device, amp)
    assert (rt.device.type, rt.amp_dtype) == expected


def test_cuda_requested_without_a_gpu_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="torch sees no CUDA device"):
        resolve_runtime("cuda")


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_training_keeps_fp32_weights_and_learns(amp_dtype):
    """The loop that runs on the GPU (autocast, GradScaler for fp16, channels_last), here on CPU."""
    stats = dataset_spec("fashion-mnist").pixel_stats
    torch.manual_seed(0)
    rt = Runtime(torch.device("cpu"), amp_dtype, channels_last=True)
    model = rt.prepare(new_classifier(stats, 3, 16, seed=0))
    x = torch.randint(0, 255, (16, 1, 28, 28), dtype=torch.uint8)
    y = (x.float().mean((1, 2, 3)) > x.float().mean()).long()  # learnable from brightness
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = fit(model, ce_loss, (x, y), epochs=1, batch_size=8, optimizers=make_optimizers(model, "sgd", 0.05),
              runtime=rt, generator=torch.Generator().manual_seed(0))
    assert math.isfinite(out.loss)
    state = model.state_dict()
    assert all(v.dtype == before[k].dtype for k, v in state.items())  # autocast never changes stored dtypes
    assert any(not torch.equal(v, before[k]) for k, v in state.items() if v.is_floating_point())
    conv = next(v for v in state.values() if v.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    # What leaves the device: CPU, fp32, the same values, in the plain layout Flower's Array expects.
    back = from_record(to_record(state))
    for k, v in state.items():
        assert back[k].device.type == "cpu" and back[k].dtype == v.dtype
        torch.testing.assert_close(back[k], v.cpu(), rtol=0, atol=0)


def test_half_precision_tensors_are_sent_as_fp32():
    """Flower's Array cannot carry bf16 losslessly: records cast half floats up, never down."""
    state = {"a": torch.tensor([1.5, -2.25], dtype=torch.bfloat16), "b": torch.tensor([0.1], dtype=torch.float16)}
    back = from_record(to_record(state))
    assert back["a"].dtype == torch.float32 and back["a"].tolist() == [1.5, -2.25]
    assert back["b"].dtype == torch.float32 and back["b"].item() == pytest.approx(0.1, abs=1e-3)


def test_gpu_threads_follow_the_cpus_given(monkeypatch):
    """Each virtual client sets torch's threads from OMP_NUM_THREADS (Ray sets it from client resources)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    try:
        assert training.set_torch_threads(0) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
