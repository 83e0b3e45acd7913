"""The one training loop and the one evaluation function.

Every stage (FedCE, experts, gate) and every baseline (local classifier,
centralized MoE) trains with :func:`fit` and is scored with :func:`evaluate`,
so that the numbers in a results table differ only in what was trained, never
in how it was trained or measured. Data stays in tensors on the training
device; batches are gathered by index.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..constants import ACCURACY, IID_PREFIX, MACRO_F1
from ..data import ImageSet
from ..data.augment import random_crop_flip

LossFn = Callable[[nn.Module, tuple[Tensor, ...]], tuple[Tensor, Tensor]]
"""``loss_fn(model, batch) -> (mean loss, number of correct predictions)``."""

Augment = Callable[[Tensor, torch.Generator], Tensor]
"""``augment(uint8 batch, generator) -> augmented batch``, on the batch's device."""

AUGMENT_PAD = 2  # pixels of random translation (28x28 and 32x32 inputs)


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors are computed.

    Attributes
    ----------
    device : torch.device
    amp_dtype : torch.dtype or None
        Autocast dtype (bf16/fp16 on CUDA), ``None`` for plain fp32.
    channels_last : bool
        Use NHWC memory format for 4-D activations (+20-39 % on CPU here).
    """

    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast context for forward passes (no-op without AMP)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def inputs(self, x: Tensor) -> Tensor:
        """Put a batch in the memory format the model expects."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move a model to the device and memory format."""
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model


@dataclass(frozen=True)
class DeviceData:
    """A labelled data set on the training device (images stay uint8)."""

    x: Tensor
    y: Tensor

    @classmethod
    def of(cls, data: ImageSet, runtime: Runtime) -> DeviceData:
        """Copy an :class:`~nmoe_flwr.data.ImageSet` to ``runtime.device`` once."""
        return cls(data.images.to(runtime.device), data.labels.to(runtime.device))


def crop_flip(enabled: bool) -> Augment | None:
    """The supervised augmentation (``AUGMENT_PAD``-pixel translation and
    horizontal flip), or ``None`` when ``augment`` is off."""
    return (lambda x, g: random_crop_flip(x, AUGMENT_PAD, g)) if enabled else None


def resolve_runtime(device: str = "auto", amp: str = "auto", channels_last: bool = True) -> Runtime:
    """Turn the ``device``/``amp``/``channels-last`` config into a :class:`Runtime`.

    ``device="auto"`` picks CUDA when available; ``amp="auto"`` uses bf16 on
    GPUs that support it, fp16 on older ones and nothing on CPU (bf16 matmul
    is slower than fp32 on most CPUs).
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device = 'cuda' was requested but torch sees no CUDA device")
    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    amp_dtype: torch.dtype | None = None
    if amp == "bf16" or (amp == "auto" and dev.type == "cuda" and torch.cuda.is_bf16_supported()):
        amp_dtype = torch.bfloat16
    elif amp == "fp16" or (amp == "auto" and dev.type == "cuda"):
        amp_dtype = torch.float16
    return Runtime(dev, amp_dtype, channels_last)


def set_torch_threads(requested: int = 0) -> int:
    """Match torch's intra-op threads to the CPUs this process was given.

    ``requested = 0`` follows ``OMP_NUM_THREADS``, which Ray sets to the
    ``client-resources-num-cpus`` of each virtual client; without it, all
    cores. Oversubscribing two cores with two clients x two threads costs
    about 11 % here (DESIGN.md section 7).
    """
    n = requested or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or (os.cpu_count() or 1)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def log_prior(ids: Tensor, size: int, smoothing: float = 1.0) -> Tensor:
    """``(size,)`` log share of each id among ``ids``, with ``smoothing`` added to
    every count so that an absent id gets a finite (very negative) prior.
    The offset of logit adjustment (FedCE's class prior, the gate's routing prior)."""
    counts = torch.bincount(ids.long(), minlength=size).float() + smoothing
    return (counts / counts.sum()).log()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with ``n`` intra-op threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def cosine(progress: float, floor: float = 0.0) -> float:
    """Cosine learning-rate multiplier for ``progress`` in [0, 1]."""
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def make_optimizers(
    model: nn.Module,
    kind: str,
    lr: float,
    *,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    muon_lr: float = 0.02,
) -> list[torch.optim.Optimizer]:
    """Optimizers over the model's trainable parameters.

    ``kind`` is ``"sgd"`` (Nesterov-free momentum SGD), ``"adamw"``, or
    ``"muon"``: Muon (``torch.optim.Muon``) for 2-D weight matrices, which is
    the only shape it accepts, and AdamW at ``lr`` for everything else
    (biases, norms) -- the split nanoGPT-style models make by tensor rank.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "sgd":
        return [torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)]
    if kind == "adamw":
        return [torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)]
    if kind == "muon":
        matrices = [p for p in params if p.dim() == 2]
        rest = [p for p in params if p.dim() != 2]
        opts: list[torch.optim.Optimizer] = [
            torch.optim.Muon(matrices, lr=muon_lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
        ]
        if rest:
            opts.append(torch.optim.AdamW(rest, lr=lr, weight_decay=weight_decay))
        return opts
    raise ValueError(f"optimizer kind must be 'sgd', 'adamw' or 'muon', got {kind!r}")


def normalize_gradients(params: Sequence[nn.Parameter], eps: float = 1e-12) -> None:
    """Rescale every parameter's gradient to unit L2 norm (per tensor).

    The NMoE paper's FedGate "gradient normalization ... to avoid the
    gradient exploding or vanishing": the step direction is kept and its
    size is left to the optimizer's learning rate.
    """
    for p in params:
        if p.grad is not None:
            p.grad.div_(p.grad.norm().clamp_min(eps))


@dataclass(frozen=True)
class FitStats:
    """What :func:`fit` reports: mean loss and accuracy over all batches seen."""

    loss: float
    accuracy: float
    num_examples: int  # distinct training samples (FedAvg's weight)
    seconds: float


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    data: tuple[Tensor, ...],
    *,
    epochs: int,
    batch_size: int,
    optimizers: Sequence[torch.optim.Optimizer],
    runtime: Runtime,
    generator: torch.Generator,
    lr_multiplier: Callable[[float], float] | None = None,
    augment: Augment | None = None,
    grad_norm: bool = False,
    grad_clip: float | None = None,
) -> FitStats:
    """Train ``model`` in place for ``epochs`` passes over ``data``.

    Parameters
    ----------
    model : nn.Module
        Already on ``runtime.device`` (see :meth:`Runtime.prepare`).
    loss_fn : LossFn
        Maps ``(model, batch)`` to ``(loss, n_correct)``; the batch is the
        tuple of ``data`` tensors indexed by the same random rows.
    data : tuple of Tensor
        Tensors with the same first dimension, on ``runtime.device``; the
        first one is augmented if ``augment`` is given.
    lr_multiplier : callable, optional
        ``progress in [0, 1) -> factor`` on every optimizer's initial
        learning rates, updated every step (e.g. :func:`cosine`).
    grad_norm : bool
        Normalise each gradient tensor to unit norm (:func:`normalize_gradients`).
    grad_clip : float, optional
        Clip the global gradient norm.

    Returns
    -------
    FitStats
    """
    t0 = time.perf_counter()
    n = data[0].shape[0]
    params = [p for p in model.parameters() if p.requires_grad]
    base_lrs = [[g["lr"] for g in opt.param_groups] for opt in optimizers]
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps, step = max(1, epochs * steps_per_epoch), 0
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16)
    loss_sum, correct, seen = torch.zeros((), device=runtime.device), torch.zeros((), device=runtime.device), 0
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, device=runtime.device, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            if idx.numel() < 2 and n > 1:
                continue  # a batch of one breaks BatchNorm and teaches nothing
            batch = tuple(t[idx] for t in data)
            if augment is not None:
                batch = (augment(batch[0], generator), *batch[1:])
            batch = (runtime.inputs(batch[0]), *batch[1:])
            if lr_multiplier is not None:
                factor = lr_multiplier(step / total_steps)
                for opt, lrs in zip(optimizers, base_lrs):
                    for group, lr in zip(opt.param_groups, lrs):
                        group["lr"] = lr * factor
            with runtime.autocast():
                loss, n_correct = loss_fn(model, batch)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            for opt in optimizers:
                scaler.unscale_(opt)
            if grad_norm:
                normalize_gradients(params)
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(params, grad_clip)
            for opt in optimizers:
                scaler.step(opt)
            scaler.update()
            # Accumulate on the device: a .item() per step would sync the GPU.
            loss_sum += loss.detach().float() * idx.numel()
            correct += n_correct.detach().float()
            seen += idx.numel()
            step += 1
    for opt, lrs in zip(optimizers, base_lrs):  # leave the optimizers as found
        for group, lr in zip(opt.param_groups, lrs):
            group["lr"] = lr
    seen = max(seen, 1)
    return FitStats(
        loss=float(loss_sum) / seen,
        accuracy=float(correct) / seen,
        num_examples=n,
        seconds=time.perf_counter() - t0,
    )


def ce_loss(model: nn.Module, batch: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """Cross entropy of a classifier on ``(x, y)``; the :data:`LossFn` of FedCE,
    experts and the local baseline."""
    x, y = batch
    logits = model(x)
    return nn.functional.cross_entropy(logits.float(), y), (logits.argmax(1) == y).sum()


@torch.no_grad()
def predict(
    fn: Callable[[Tensor], Tensor], x: Tensor, batch_size: int, runtime: Runtime
) -> Tensor:
    """Apply ``fn`` to ``x`` in batches without gradients; outputs are concatenated in fp32."""
    outs = []
    for start in range(0, x.shape[0], batch_size):
        with runtime.autocast():
            outs.append(fn(runtime.inputs(x[start : start + batch_size])).float())
    return torch.cat(outs)


def classification_metrics(pred: Tensor, labels: Tensor, num_classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 of predicted class ids.

    Macro-F1 averages the per-class ``F1 = 2 TP / (2 TP + FP + FN)`` over
    the classes that occur in ``labels`` or ``pred`` (scikit-learn's
    convention), so a classifier that only ever predicts a client's dominant
    class gets a low macro-F1 even when its accuracy is high.
    """
    pred, labels = pred.long().cpu(), labels.long().cpu()
    conf = torch.bincount(labels * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes)
    tp = conf.diag().double()
    fp = conf.sum(0).double() - tp
    fn = conf.sum(1).double() - tp
    present = (conf.sum(0) + conf.sum(1)) > 0
    f1 = torch.where(present, 2 * tp / (2 * tp + fp + fn).clamp_min(1), torch.zeros_like(tp))
    return {
        ACCURACY: float(tp.sum() / max(labels.numel(), 1)),
        MACRO_F1: float(f1[present].mean()) if present.any() else 0.0,
    }


def evaluate(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    num_classes: int,
    batch_size: int,
    runtime: Runtime,
) -> dict[str, float]:
    """Accuracy and macro-F1 of ``fn`` (inputs -> class scores) on ``(x, y)``."""
    scores = predict(fn, x, batch_size, runtime)
    return classification_metrics(scores.argmax(1), y, num_classes)


def mean_over_clients(
    per_client: Mapping[int, Mapping[str, float]],
    keys: Sequence[str] = (ACCURACY, MACRO_F1, IID_PREFIX + ACCURACY, IID_PREFIX + MACRO_F1),
) -> dict[str, float]:
    """Unweighted mean over clients of every one of ``keys`` all clients
    report (the paper's "average accuracy and F1"; ``iid-`` keys: on the IID
    test set). Summed in client-id order, so the float result does not depend
    on the order the clients answered in."""
    rows = [per_client[c] for c in sorted(per_client)]
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys if rows and all(k in r for r in rows)}
