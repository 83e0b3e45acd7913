"""The run config: one frozen pydantic model, parsed once at each edge.

Every key has its default in ``pyproject.toml`` (``[tool.flwr.app.config]``);
this model is the single place that says what each key means and what values
are allowed. The ServerApp validates ``context.run_config`` before any
training starts and the ClientApp parses the same dict, so a wrong key, type
or value fails at once with a message naming the key, the value and what is
allowed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, get_args, get_origin

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .algorithms.alignment import RULES
from .algorithms.models import NORMS
from .data.registry import DATASETS

RUN_NAME_PATTERN = r"^([A-Za-z0-9][A-Za-z0-9._-]{0,127})?$"
"""A run name is one plain folder name: no separators, no leading dot (it never escapes output-dir)."""

FE_METHODS = ("fedce", "fedsc")
"""Stage-1 methods (``fe-method``); the server's registry is
:data:`nmoe_flwr.pipelines.extractor.EXTRACTOR_METHODS`."""


class ConfigError(ValueError):
    """A run-config key, type or value is not allowed (message says which)."""


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class RunConfig(BaseModel):
    """Validated run config of the NMoE pipeline (keys are kebab-case)."""

    # strict: a boolean is not a number and "0" is not False (an int is still a valid float);
    # allow_inf_nan=False: infinity means something only where a field says so (dp-epsilon).
    model_config = ConfigDict(
        frozen=True, extra="forbid", alias_generator=_kebab, populate_by_name=True, strict=True, allow_inf_nan=False
    )

    # Run and outputs
    seed: int = Field(0, ge=0)
    run_name: str = Field("", pattern=RUN_NAME_PATTERN)  # "" -> "run-<flower run id>"; a plain folder name
    output_dir: str = ""  # "" -> $NMOE_OUTPUT_DIR, else ./outputs
    stages: Literal["all", "fe"] = "all"  # "fe": stop after stage 1 (benchmarks)
    pipeline: Literal["nmoe", "alignment"] = "nmoe"  # alignment: global MoE with expert assignment
    resume: bool = False  # continue the run in <output-dir>/<run-name> from its checkpoints (nmoe-run --resume)

    # Data and partitioning (NMoE paper, Sec. IV-A)
    dataset: Literal[tuple(DATASETS)] = "fashion-mnist"  # the data-set registry, nmoe_flwr/data/registry.py
    data_dir: str = ""  # "" -> $NMOE_DATA_DIR, else the dataset's default folder
    hf_dataset: str = ""  # Hugging Face data set id; needs the [hf] extra + internet
    num_clients: int = Field(10, ge=2, le=1000)
    train_per_client: int = Field(1000, ge=10)  # checked against the data set's size (see _cross_checks)
    test_per_client: int = Field(1000, ge=10)
    partition: Literal["iid", "dominant"] = "dominant"
    tau: float = Field(0.1, gt=0.0, lt=1.0)
    test_distribution: Literal["same", "iid"] = "same"
    unlabeled_per_client: int = Field(0, ge=0)  # extra samples only FedSC sees

    # Shared training settings
    batch_size: int = Field(128, ge=1, le=65536)
    mlp_hidden: int = Field(128, ge=1, le=8192)
    augment: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    channels_last: bool = True
    torch_threads: int = Field(0, ge=0)  # 0 -> CPUs Flower gives each client
    round_timeout: float = Field(3600.0, ge=1.0)  # seconds; below 1 s no client can answer
    # Seconds a round waits for absent nodes (a restarted SuperNode rejoins) before going on without them;
    # above the SuperLink's 60 s to mark a dead node offline (30 s heartbeat x patience 2).
    rejoin_timeout: float = Field(120.0, ge=0.0)
    fault_drop_rate: float = Field(0.0, ge=0, lt=1)  # simulation: share of clients failing each training round (nmoe_flwr/faults.py)
    fault_straggler_rate: float = Field(0.0, ge=0, lt=1)  # simulation: share answering after round-timeout

    # Stage 1: feature extractor
    fe_method: Literal[FE_METHODS] = "fedce"
    extractor_norm: Literal[NORMS] = "batch"  # ResNet20 with BatchNorm, or "none" (Fixup; FedSC's public code)
    fraction_train: float = Field(1.0, gt=0, le=1)  # share of clients sampled per round (FedCE, FedSC, gate, MoE)
    knn_k: int = Field(20, ge=1)  # neighbours of the kNN probe of the extractor
    pooled_probe: bool = True  # probes on all clients' data pooled, with floors, and the router ceiling (server-side)
    fedce_rounds: int = Field(30, ge=1)
    fedce_local_epochs: int = Field(1, ge=1)
    fedce_average_head: bool = True
    fedce_logit_adjust: float = Field(1.0, ge=0.0, le=10.0)  # ours: tau of logit-adjusted local CE (0: the paper's FedCE)
    fedce_server_momentum: float = Field(0.7, ge=0.0, lt=1.0)  # ours: FedAvgM momentum on the server (0: FedAvg)
    fedce_prox_mu: float = Field(0.0, ge=0.0, le=100.0)  # ours as an option: FedProx's proximal weight (0: off, the paper's)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)

    # Stage 1 with fe-method = "fedsc" (DESIGN.md section 4)
    fedsc_rounds: int = Field(30, ge=1)
    fedsc_local_epochs: int = Field(1, ge=1)
    fedsc_lr: float = Field(0.03, gt=0)
    fedsc_batch_size: int = Field(256, ge=2)
    fedsc_mu: float = Field(4.0, gt=0)  # embeddings clipped to norm sqrt(mu)
    fedsc_alpha_start: float = Field(1.0, ge=0, le=1)
    fedsc_alpha_end: float = Field(0.2, ge=0, le=1)
    fedsc_proj_dim: int = Field(128, ge=1)
    fedsc_corr_passes: int = Field(2, ge=1)  # augmented passes per correlation matrix
    fedsc_grad_clip: float = Field(3.0, gt=0)
    fedsc_gray_jitter: bool = True  # ours: brightness/contrast jitter of 1-channel views (issue 11, README)
    fedsc_stale_matrices: Literal["reuse", "drop"] = "reuse"
    dp_epsilon: float = Field(8.0, gt=0, allow_inf_nan=True)  # inf turns the noise off
    dp_delta: float = Field(1e-5, gt=0, lt=1)

    # Stage 2: personalized experts on cached latents
    expert_epochs: int = Field(30, ge=0)
    expert_lr: float = Field(1e-3, gt=0)
    expert_init: Literal["auto", "head", "scratch"] = "auto"  # auto: from the FedCE head where the client has one

    # Stage 3: gate
    gate_method: Literal["fedgate", "fedavg", "local"] = "fedavg"
    gate_rounds: int = Field(50, ge=1)
    gate_local_epochs: int = Field(1, ge=1)
    gate_lr: float = Field(1e-3, gt=0)  # AdamW: biases
    gate_muon_lr: float = Field(0.02, gt=0)  # Muon: 2-D weights
    gate_optimizer: Literal["muon", "adamw"] = "muon"
    gate_grad_norm: bool = True
    gate_noise: float = Field(0.0, ge=0)
    gate_route_weight: float = Field(1.0, ge=0)  # ours: CE toward the expert most confident on the label; 0 = off
    # ours: the routing target stays on the own expert unless a neighbour is more confident on the label
    # by more than this (probability); 0 = the most confident expert (README "Routing only where it pays")
    gate_stay_margin: float = Field(0.05, ge=0.0, lt=1.0)
    gate_logit_adjust: float = Field(1.0, ge=0.0, le=10.0)  # ours: logits + tau * log(routing-target prior); 0 = off
    gate_train_top_k: int = Field(0, ge=0)  # 0 -> all experts while training
    gate_oof_folds: int = Field(5, ge=0)  # cross-fitted own-expert answers for the gate; 0/1 = off
    top_k: int = Field(1, ge=1)
    # ours (issue 13): experts each client receives for its gate: its own + class specialists
    # (algorithms/candidates.py); 0 = the whole bank, as in the paper
    gate_candidates: int = Field(0, ge=0)

    # Capacity-aware global MoE (pipeline = "alignment")
    num_experts: int = Field(16, ge=2, le=1024)
    capacity_tiers: str = ""  # "<tier>:<clients>,..."; "" -> every client "jetson-orin"
    assignment: Literal[RULES] = "load-balanced"  # algorithms/alignment.py
    moe_rounds: int = Field(40, ge=1)
    moe_local_epochs: int = Field(1, ge=1)
    moe_lr: float = Field(1e-3, gt=0)
    moe_train_top_k: int = Field(2, ge=1)
    fitness_beta: float = Field(0.5, gt=0, le=1)
    fitness_gamma: float = Field(0.9, ge=0, le=1)
    fitness_improvement_weight: float = Field(1.0, ge=0)
    usage_delta: float = Field(0.7, ge=0, lt=1)
    fitness_weight: float = Field(1.0, ge=0)
    usage_weight: float = Field(1.0, ge=0)
    load_cap_slack: float = Field(1.0, ge=1)
    target_accuracy: float = Field(0.7, gt=0, le=1)
    extractor_checkpoint: str = ""  # <run>/extractor.pt of an earlier run (+ head.pt beside it), reused instead of stage 1

    # Baselines
    local_baseline: bool = True
    local_epochs: int = Field(30, ge=1)
    centralized_baseline: bool = True
    centralized_epochs: int = Field(30, ge=1)

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        n = self.num_clients
        if self.top_k > n:
            raise ValueError(f"top-k = {self.top_k} exceeds num-clients = {n} experts")
        if self.gate_train_top_k > n:
            raise ValueError(
                f"gate-train-top-k = {self.gate_train_top_k} exceeds num-clients = {n} experts"
            )
        if 0 < self.gate_candidates < max(self.top_k, self.gate_train_top_k, 2):
            raise ValueError(
                f"gate-candidates = {self.gate_candidates} must be 0 (the whole bank) or at least 2, top-k "
                f"({self.top_k}) and gate-train-top-k ({self.gate_train_top_k})"
            )
        if self.fault_drop_rate + self.fault_straggler_rate >= 1:
            raise ValueError("fault-drop-rate + fault-straggler-rate must be < 1 (some client has to answer)")
        if math.isnan(self.dp_epsilon):
            raise ValueError("dp-epsilon must be a number (inf turns the noise off), got nan")
        if self.moe_train_top_k > self.num_experts:
            raise ValueError(f"moe-train-top-k = {self.moe_train_top_k} exceeds num-experts = {self.num_experts}")
        if not self.hf_dataset:
            _check_sizes(self)
        if self.fe_method == "fedsc" and self.expert_init == "head":
            raise ValueError("expert-init = 'head' needs fe-method = 'fedce' (FedSC trains no head); use 'auto' or 'scratch'")
        if self.pipeline == "alignment":
            from .capacity import parse_tiers

            parse_tiers(self.tiers_spec, self.num_clients)  # raises naming the bad entry
        return self

    @property
    def tiers_spec(self) -> str:
        """``capacity-tiers``, defaulting to every client being a Jetson Orin."""
        return self.capacity_tiers or f"jetson-orin:{self.num_clients}"

    @property
    def train_k(self) -> int:
        """Experts kept per sample while training the gate (0 means all)."""
        return self.gate_train_top_k or self.num_clients

    def to_dict(self) -> dict[str, Any]:
        """The resolved config with its kebab-case keys (for results.json)."""
        return self.model_dump(by_alias=True)


def _check_sizes(cfg: RunConfig) -> None:
    """Raise if the partition asks for more images of some class than the data set has.

    Labelled and unlabelled training samples come from the training split
    (disjoint), the test sets from the test split; the IID test set is drawn
    from the test split on its own.
    """
    from .data.partition import class_counts

    spec = DATASETS[cfg.dataset]
    if spec.per_class is None:
        return

    def need(scheme: str, per_client: int) -> np.ndarray:
        return sum(class_counts(scheme, cfg.tau, per_client, spec.num_classes, c) for c in range(cfg.num_clients))

    test_scheme = cfg.partition if cfg.test_distribution == "same" else "iid"
    asks = {
        "train": (need(cfg.partition, cfg.train_per_client) + need(cfg.partition, cfg.unlabeled_per_client),
                  "train-per-client + unlabeled-per-client"),
        "test": (np.maximum(need(test_scheme, cfg.test_per_client), need("iid", cfg.test_per_client)), "test-per-client"),
    }
    for split, (counts, keys) in asks.items():
        worst = int(np.argmax(counts))
        if counts[worst] > spec.per_class[split]:
            raise ValueError(
                f"{keys} over {cfg.num_clients} clients (partition {cfg.partition!r}, tau {cfg.tau:g}) needs "
                f"{int(counts[worst])} {split} images of class {worst}; {cfg.dataset} has {spec.per_class[split]} per class"
            )


def valid_keys() -> list[str]:
    """All run-config keys, kebab-case, in declaration order."""
    return [_kebab(name) for name in RunConfig.model_fields]


def allowed_values(key: str) -> str:
    """Human-readable description of what a key accepts, e.g. ``'0 < x < 1'``."""
    field = RunConfig.model_fields[key.replace("-", "_")]
    args = get_args(field.annotation)
    if get_origin(field.annotation) is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    bounds = []
    for m in field.metadata:
        for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if getattr(m, attr, None) is not None:
                bounds.append(f"{op} {getattr(m, attr)}")
        if getattr(m, "pattern", None):
            bounds.append(f"matching {m.pattern}")
    kind = getattr(field.annotation, "__name__", str(field.annotation))
    if kind == "float":
        infinite = any(getattr(m, "allow_inf_nan", None) for m in field.metadata)
        kind = "float (inf allowed)" if infinite else "finite float"
    return kind + (" " + " and ".join(bounds) if bounds else "")


def parse_run_config(raw: Mapping[str, Any]) -> RunConfig:
    """Validate a Flower run config into a :class:`RunConfig`.

    Raises
    ------
    ConfigError
        One line per problem, naming the key, the value given and what is
        allowed; unknown keys list the valid ones.
    """
    try:
        return RunConfig.model_validate(dict(raw))
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(config)"
            if err["type"] == "extra_forbidden":
                lines.append(
                    f"unknown key '{key}' (value {err['input']!r}); valid keys: "
                    + ", ".join(valid_keys())
                )
            elif not err["loc"]:
                lines.append(err["msg"].removeprefix("Value error, "))
            else:
                lines.append(
                    f"key '{key}' = {err['input']!r}: {err['msg']} (allowed: {allowed_values(key)})"
                )
        raise ConfigError("invalid run config:\n  " + "\n  ".join(lines)) from None
