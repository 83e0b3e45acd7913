"""Models of the Networked MoE (NMoE paper, Sec. II-III).

- :class:`ResNet20` -- the shared feature extractor ``F`` (He et al. 2016,
  CIFAR variant, option-A shortcuts, about 0.27 M parameters).
- :class:`MLP` -- the 4-layer expert ``H_i`` / classifier head.
- :class:`Classifier` -- ``H(F(x))``, the FedCE model of stage 1.
- :class:`Gate` -- the gating network ``G_i``: named ``shared`` layers that
  FedGate averages and a ``decision`` layer that stays local.
- :func:`route` and :func:`nmoe_combine` -- the noisy top-k router and the
  combination ``y = sum_j w_j softmax(H_j(h))`` of the picked experts.
- :class:`CentralizedMoE` -- extractor, gate and experts in one module, the
  paper's centralized upper bound.

State-dict keys start with the names of the sub-modules (``extractor.``,
``head.``, ``shared.``, ``decision.``, ``gate.``, ``experts.<j>.``);
:mod:`nmoe_flwr.constants` holds these prefixes and the strategies aggregate
by them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.registry import PixelStats

NORMS = ("batch", "none")
"""Normalisation of the ResNet20 (``extractor-norm``): BatchNorm, or none (Fixup)."""


def _shortcut(x: Tensor, stride: int, pad: int) -> Tensor:
    """Option A of the ResNet paper: subsample and zero-pad channels (parameter-free,
    which keeps ResNet20 at 0.27 M parameters)."""
    if stride == 1 and not pad:
        return x
    x = x[:, :, ::stride, ::stride]
    return F.pad(x, (0, 0, 0, 0, pad // 2, pad - pad // 2))


class _BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an option-A (parameter-free) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride, self.pad = stride, c_out - c_in

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + _shortcut(x, self.stride, self.pad))


class _FixupBlock(nn.Module):
    """The same block without normalisation: Fixup (Zhang et al., ICLR 2019).

    A scalar bias before each convolution and activation and a scalar
    multiplier on the branch stand in for BatchNorm's affine part;
    :class:`ResNet20` zero-initialises ``conv2`` and scales ``conv1`` by
    ``L ** -0.5`` (``L`` = 9 blocks), so every branch starts as the identity.
    No statistics: an embedding depends on its own sample only, in training
    as in evaluation (what FedSC's privacy bound needs).
    """

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bias1a, self.bias1b, self.bias2a, self.bias2b = (nn.Parameter(torch.zeros(1)) for _ in range(4))
        self.scale = nn.Parameter(torch.ones(1))
        self.stride, self.pad = stride, c_out - c_in

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.conv1(x + self.bias1a) + self.bias1b)
        out = self.conv2(out + self.bias2a) * self.scale + self.bias2b
        return F.relu(out + _shortcut(x, self.stride, self.pad))


class ResNet20(nn.Module):
    """CIFAR-style ResNet20 feature extractor with a 64-d output.

    Parameters
    ----------
    stats : PixelStats
        The data set's pixel statistics (its registry entry,
        :func:`nmoe_flwr.data.pixel_stats_for`); the input has
        ``stats.channels`` channels.
    norm : {"batch", "none"}
        BatchNorm (the paper's ResNet20) or no normalisation with Fixup's
        initialisation (FedSC's public code; ``extractor-norm``).

    Notes
    -----
    Takes ``uint8`` (or float in [0, 255]) images of shape ``(B, C, H, W)``
    and normalises them internally, so data stays ``uint8`` (4x smaller)
    from disk to the training device; any spatial size works thanks to the
    global average pool.
    """

    out_dim = 64

    def __init__(self, stats: PixelStats, norm: str = "batch") -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")
        self.norm = norm
        # Non-persistent: constants are not weights, so they never travel.
        self.register_buffer("mean", torch.tensor(stats.mean).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(stats.std).view(1, -1, 1, 1) * 255, persistent=False)
        self.conv = nn.Conv2d(stats.channels, 16, 3, 1, 1, bias=False)
        if norm == "batch":
            self.bn = nn.BatchNorm2d(16)
        else:
            self.bias = nn.Parameter(torch.zeros(1))
        block = _BasicBlock if norm == "batch" else _FixupBlock
        layers: list[nn.Module] = []
        c_in = 16
        for c_out, stride in ((16, 1), (32, 2), (64, 2)):
            for b in range(3):
                layers.append(block(c_in, c_out, stride if b == 0 else 1))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if norm == "none":  # Fixup's initialisation: every residual branch starts at zero
            with torch.no_grad():
                for m in self.layers:
                    m.conv1.weight.mul_(len(self.layers) ** -0.5)
                    m.conv2.weight.zero_()

    def forward(self, x: Tensor) -> Tensor:
        x = (x.float() - self.mean) / self.std  # (B, C, H, W)
        x = F.relu(self.bn(self.conv(x))) if self.norm == "batch" else F.relu(self.conv(x) + self.bias)
        x = self.layers(x)  # (B, 64, H/4, W/4)
        return x.mean(dim=(2, 3))  # (B, 64)

    @staticmethod
    def norm_of(state: Mapping[str, Tensor]) -> str:
        """The ``norm`` a bare ResNet20 state dict was made with (BatchNorm has ``bn.*`` entries)."""
        return "batch" if "bn.weight" in state else "none"


def _he_init(module: nn.Module) -> None:
    """He-normal weights and zero biases for ReLU MLPs.

    PyTorch's default ``Linear`` init shrinks activations about 3x per layer;
    through a 4-layer head that starves the extractor of gradient early on
    (measured: 9 % vs 51 % test accuracy after 3 epochs on 2000 images).
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)


class MLP(nn.Module):
    """4-layer perceptron used as expert and as classifier head.

    ``in_dim -> hidden -> hidden -> hidden -> out_dim`` with ReLU between
    layers; returns logits.
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, out_dim),
        )
        _he_init(self)

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)


class Classifier(nn.Module):
    """End-to-end classifier ``H(F(x))`` (FedCE model, local baseline).

    State-dict keys start with ``extractor.`` and ``head.``.
    """

    def __init__(self, stats: PixelStats, num_classes: int, hidden: int, norm: str = "batch") -> None:
        super().__init__()
        self.num_classes = num_classes
        self.extractor = ResNet20(stats, norm)
        self.head = MLP(ResNet20.out_dim, hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.extractor(x))


class Gate(nn.Module):
    """Gating network ``G_i``: scores every expert for a latent ``h``.

    Three ``shared`` layers (averaged by FedGate) followed by a local
    ``decision`` layer, as in the NMoE paper's FedGate ablation ("we
    synchronize the first three layers while leaving the last layer as
    local"). State-dict keys start with ``shared.`` or ``decision.``, plus
    the buffer ``log_prior``: a fixed offset added to the logits, zero unless
    the client sets it (``gate-logit-adjust``, ours: the log of how often each
    expert is the routing target on the client's data), so that the trained
    layers model what is common to all clients and the offset what is local.
    """

    def __init__(self, in_dim: int, hidden: int, num_experts: int) -> None:
        super().__init__()
        self.shared = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
        )
        self.decision = nn.Linear(hidden, num_experts)
        self.register_buffer("log_prior", torch.zeros(num_experts))
        _he_init(self)

    def forward(self, h: Tensor) -> Tensor:
        return self.decision(self.shared(h)) + self.log_prior  # (B, num_experts) logits


def route(
    gate_logits: Tensor, k: int, noise_std: float = 0.0, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Noisy top-k routing: ``softmax(topk(logits + eps, k))``.

    Parameters
    ----------
    gate_logits : Tensor
        ``(B, n)`` expert scores.
    k : int
        Experts kept per sample (``1 <= k <= n``).
    noise_std : float
        Standard deviation of the Gaussian ``eps`` (training only; 0 at
        inference, which gives plain top-k).
    generator : torch.Generator, optional
        Source of the noise, so that noisy routing is reproducible.

    Returns
    -------
    weights, index : Tensor
        ``(B, k)`` softmax weights over the kept scores, and the kept experts'
        indices, best first.
    """
    if not 1 <= k <= gate_logits.shape[-1]:
        raise ValueError(f"top-k must be in [1, {gate_logits.shape[-1]}], got {k}")
    if noise_std > 0:
        eps = torch.randn(gate_logits.shape, generator=generator, device=gate_logits.device)
        gate_logits = gate_logits + noise_std * eps.to(gate_logits.dtype)
    top, index = gate_logits.topk(k, dim=-1)
    return top.softmax(dim=-1), index


def mixture_probs(weights: Tensor, index: Tensor, expert_probs: Tensor) -> Tensor:
    """Combine precomputed expert answers: ``sum_j w_j p_j``.

    Parameters
    ----------
    weights, index : Tensor
        ``(B, k)`` output of :func:`route`.
    expert_probs : Tensor
        ``(B, n, C)`` class probabilities of every expert for every sample.

    Returns
    -------
    Tensor
        ``(B, C)`` mixture class probabilities.
    """
    picked = expert_probs.gather(1, index.unsqueeze(-1).expand(-1, -1, expert_probs.shape[-1]))
    return (weights.unsqueeze(-1) * picked).sum(dim=1)


def nmoe_combine(
    h: Tensor, weights: Tensor, index: Tensor, experts: Sequence[nn.Module]
) -> Tensor:
    """Networked-MoE combine that runs only the experts that were picked.

    Samples are grouped by expert and each group is answered in one call --
    exactly what a device does when it sends latents to its neighbours --
    then the answers are mixed with the gate weights.

    Parameters
    ----------
    h : Tensor
        ``(B, d)`` latents.
    weights, index : Tensor
        ``(B, k)`` output of :func:`route`.
    experts : sequence of nn.Module
        Expert ``j`` maps ``(b, d)`` latents to ``(b, C)`` logits.

    Returns
    -------
    Tensor
        ``(B, C)`` mixture class probabilities ``sum_j w_j softmax(H_j(h))``.
    """
    out: Tensor | None = None
    for j in index.unique().tolist():
        rows, slot = (index == j).nonzero(as_tuple=True)
        probs = experts[j](h[rows]).float().softmax(dim=-1)  # (b, C)
        if out is None:
            out = h.new_zeros(h.shape[0], probs.shape[-1], dtype=torch.float32)
        out.index_add_(0, rows, weights[rows, slot].float().unsqueeze(-1) * probs)
    assert out is not None
    return out


def mixture_nll(probs: Tensor, labels: Tensor) -> Tensor:
    """Negative log-likelihood of a mixture's class probabilities.

    ``-log sum_j w_j p_j(y | h)`` is the classic MoE objective (Jacobs et al.
    1991): unlike mixing logits it rewards putting the gate's mass on the
    expert that is right, which is what top-1 routing needs at inference.
    """
    return -probs.gather(1, labels.unsqueeze(1)).clamp_min(1e-8).log().mean()


class CentralizedMoE(nn.Module):
    """Extractor, gate and all experts in one module (centralized upper bound).

    Trained jointly on pooled data; ``forward`` returns mixture class
    probabilities under noisy top-k routing.
    """

    def __init__(self, stats: PixelStats, num_classes: int, num_experts: int, hidden: int, norm: str = "batch") -> None:
        super().__init__()
        self.extractor = ResNet20(stats, norm)
        self.gate = Gate(ResNet20.out_dim, hidden, num_experts)
        self.experts = nn.ModuleList(
            MLP(ResNet20.out_dim, hidden, num_classes) for _ in range(num_experts)
        )

    def forward(
        self, x: Tensor, k: int, noise_std: float = 0.0, generator: torch.Generator | None = None
    ) -> Tensor:
        h = self.extractor(x)
        weights, index = route(self.gate(h), k, noise_std, generator)
        if self.training:
            # All experts run while training so that every expert gets gradient.
            probs = torch.stack([e(h) for e in self.experts], dim=1).float().softmax(-1)
            return mixture_probs(weights.float(), index, probs)
        return nmoe_combine(h, weights, index, self.experts)


class GlobalMoE(nn.Module):
    """A global MoE on latents: one gate over ``num_experts`` experts.

    The model of capacity-aware federated MoE training (alignment paper):
    keys ``gate.*`` and ``experts.<j>.*``; a client trains the gate and only
    the experts it was assigned (``allowed``), routing restricted to them.
    """

    def __init__(self, in_dim: int, hidden: int, num_classes: int, num_experts: int) -> None:
        super().__init__()
        self.gate = Gate(in_dim, hidden, num_experts)
        self.experts = nn.ModuleList(MLP(in_dim, hidden, num_classes) for _ in range(num_experts))

    def forward(
        self,
        h: Tensor,
        k: int,
        allowed: Sequence[int] | None = None,
        noise_std: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Mixture class probabilities ``(B, C)`` and the top-1 expert ``(B,)``.

        With ``allowed``, the gate's scores of all other experts are masked
        out and only the allowed experts run; ``k`` is capped at their number.
        """
        logits = self.gate(h)
        ids = list(range(len(self.experts))) if allowed is None else list(allowed)
        if allowed is not None:
            mask = torch.full_like(logits, float("-inf"))
            mask[:, ids] = 0.0
            logits = logits + mask
        weights, index = route(logits, min(k, len(ids)), noise_std, generator)
        if self.training:
            probs = torch.zeros(h.shape[0], len(self.experts), self.experts[0].net[-1].out_features, device=h.device)
            for j in ids:  # every allowed expert runs, so every one gets gradient
                probs[:, j] = self.experts[j](h).float().softmax(-1)
            return mixture_probs(weights.float(), index, probs), index[:, 0]
        return nmoe_combine(h, weights, index, self.experts), index[:, 0]


def num_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
