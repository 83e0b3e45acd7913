"""The centralized MoE: the paper's upper bound, trained on pooled data in one process."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..config import RunConfig
from ..data.registry import PixelStats
from .models import CentralizedMoE, mixture_nll
from .seeding import derive_seed, generator, seeded
from .training import (
    DeviceData,
    Runtime,
    cosine,
    crop_flip,
    evaluate,
    fit,
    make_optimizers,
)


def train_centralized_moe(
    train: DeviceData,
    tests: Sequence[DeviceData],
    stats: PixelStats,
    num_classes: int,
    cfg: RunConfig,
    runtime: Runtime,
) -> list[dict[str, float]]:
    """Extractor, gate and ``num-clients`` experts trained jointly on pooled data.

    The paper's upper bound: same architectures, same loss as the gate
    (mixture NLL under noisy top-k), same training loop; evaluated with
    top-k routing on each client's test set.

    Returns
    -------
    list of dict
        Accuracy and macro-F1 on each of ``tests``, in order.
    """
    with seeded(derive_seed(cfg.seed, "centralized-init")):
        model = CentralizedMoE(stats, num_classes, cfg.num_clients, cfg.mlp_hidden, cfg.extractor_norm)
    model = runtime.prepare(model)
    noise = generator(derive_seed(cfg.seed, "centralized-noise"), runtime.device)

    def loss_fn(m: nn.Module, batch: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        x, y = batch
        probs = m(x, cfg.train_k, cfg.gate_noise, noise)
        return mixture_nll(probs, y), (probs.argmax(1) == y).sum()

    opts = make_optimizers(model, "sgd", cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    fit(
        model, loss_fn, (train.x, train.y),
        epochs=cfg.centralized_epochs, batch_size=cfg.batch_size, optimizers=opts, runtime=runtime,
        generator=generator(derive_seed(cfg.seed, "centralized"), runtime.device),
        augment=crop_flip(cfg.augment), lr_multiplier=cosine,
    )
    model.eval()
    return [
        evaluate(lambda x: model(x, cfg.top_k), t.x, t.y, num_classes, cfg.batch_size * 4, runtime)
        for t in tests
    ]
