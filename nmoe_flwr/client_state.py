"""A client's state between messages: its environment, its local parameters, its files.

Three places hold what a client keeps across rounds and stages:

- :class:`ClientEnv`, rebuilt from the ``Context`` for every message: the
  validated run config, the partition id, the runtime and the store.
- ``context.state`` (serialised with *every* message, so kept small): the
  local parameters of partially averaged models, written and read by
  :func:`load_partial` / :func:`split_partial`.
- :class:`ClientStore`, the client's folder on its own disk
  (``<output-dir>/<run-name>/clients/<partition-id>``): its data split,
  cached latents, the frozen expert bank, its expert's out-of-fold answers
  and the frozen extractor; and its inference checkpoint beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context
from torch import Tensor, nn

from .algorithms.seeding import derive_seed
from .algorithms.training import Runtime, resolve_runtime, set_torch_threads
from .config import RunConfig, parse_run_config
from .constants import (
    NODE_DATA_DIR,
    NODE_NUM_PARTITIONS,
    NODE_OUTPUT_DIR,
    NODE_PARTITION_ID,
)
from .data import ClientSplits, ImageSet, all_client_splits, pixel_stats_for
from .data.registry import PixelStats
from .inference.checkpoint import client_checkpoint_dir
from .records import from_record, is_packed, pack, state_subset, to_record, unpack
from .workspace import cache_dir, client_dir, run_dir


class ClientStore:
    """The one place that names a client's files on its local disk.

    Every file is written atomically (temp file + rename), so a client that
    dies mid-write leaves the previous version or none, never a torn file.

    Parameters
    ----------
    folder : Path
        ``<output-dir>/<run-name>/clients/<partition-id>`` (created on write).
    """

    DATA = "data.pt"  # the client's train/test (and unlabelled) split
    LATENTS = "latents.pt"  # {"train", "test"[, "test-iid"]}: latents of the frozen extractor
    BANK = "bank.pt"  # {expert id: state dict}: every client's frozen expert
    OWN_OOF = "own-oof.pt"  # cross-fitted answers of the own expert on its training set
    EXTRACTOR = "extractor.pt"  # the frozen ResNet20 state dict (no key prefix)

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def _save(self, name: str, obj: object) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / name
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(obj, tmp)
        tmp.replace(path)

    def _load(self, name: str) -> object:
        path = self.folder / name
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: an earlier stage of this run did not write it on this client")
        return torch.load(path, weights_only=True)

    # --- data ------------------------------------------------------------
    def splits(self, make: Callable[[], ClientSplits]) -> ClientSplits:
        """This client's split: read from disk, else ``make()`` it and keep it.

        Decoding and partitioning the full data set costs about a second;
        the client's own part is a few hundred kB, so later messages read that.
        """
        if (self.folder / self.DATA).exists():
            return self.load_splits()
        split = make()
        blob = {
            "train_x": split.train.images, "train_y": split.train.labels,
            "test_x": split.test.images, "test_y": split.test.labels,
            "num_classes": split.train.num_classes,
        }
        if split.unlabeled is not None:
            blob |= {"unl_x": split.unlabeled.images, "unl_y": split.unlabeled.labels}
        if split.test_iid is not None:
            blob |= {"test_iid_x": split.test_iid.images, "test_iid_y": split.test_iid.labels}
        self._save(self.DATA, blob)
        return split

    def load_splits(self) -> ClientSplits:
        """The split written by :meth:`splits` (``FileNotFoundError`` if none)."""
        blob = self._load(self.DATA)
        c = int(blob["num_classes"])
        unlabeled = ImageSet(blob["unl_x"], blob["unl_y"], c) if "unl_x" in blob else None
        test_iid = ImageSet(blob["test_iid_x"], blob["test_iid_y"], c) if "test_iid_x" in blob else None
        return ClientSplits(
            ImageSet(blob["train_x"], blob["train_y"], c), ImageSet(blob["test_x"], blob["test_y"], c), unlabeled, test_iid
        )

    # --- stage 2 and 3 inputs ---------------------------------------------
    def save_latents(self, latents: dict[str, Tensor]) -> None:
        """Keep the frozen extractor's latents of every part of the split
        (``"train"``, ``"test"`` and, if there is one, ``"test-iid"``)."""
        self._save(self.LATENTS, {name: h.cpu() for name, h in latents.items()})

    def latents(self, part: str) -> Tensor:
        """Cached latents of ``part`` (``"train"``, ``"test"``, ``"test-iid"``), on the CPU."""
        return self._load(self.LATENTS)[part]

    def save_extractor(self, state: dict[str, Tensor]) -> None:
        """Keep the frozen extractor (a bare ResNet20 state dict)."""
        self._save(self.EXTRACTOR, {k: v.detach().cpu() for k, v in state.items()})

    def extractor(self) -> dict[str, Tensor]:
        """The frozen extractor kept by :meth:`save_extractor`."""
        return self._load(self.EXTRACTOR)

    def save_bank(self, bank: dict[int, dict[str, Tensor]]) -> None:
        """Keep the frozen expert bank (stage 3)."""
        self._save(self.BANK, bank)

    def bank(self) -> dict[int, dict[str, Tensor]]:
        """The frozen expert bank, ordered by expert id."""
        return dict(sorted(self._load(self.BANK).items()))

    def save_own_oof(self, probs: Tensor) -> None:
        """Keep the own expert's cross-fitted answers on the training set."""
        self._save(self.OWN_OOF, {"probs": probs.cpu()})

    def own_oof(self) -> Tensor | None:
        """The own expert's cross-fitted answers, or ``None`` if none were made."""
        return self._load(self.OWN_OOF)["probs"] if (self.folder / self.OWN_OOF).exists() else None

    # --- local parameters of partially averaged models ----------------------
    def save_local(self, key: str, run_id: int, state: dict[str, Tensor]) -> None:
        """Keep the entries that never leave this client (a copy of ``context.state[key]``) for run ``run_id``."""
        self._save(f"{key}.pt", {"run-id": run_id, "state": {k: v.detach().cpu() for k, v in state.items()}})

    def local(self, key: str, run_id: int, resumed: bool = False) -> dict[str, Tensor] | None:
        """The entries :meth:`save_local` kept for this run, or ``None``.

        Only this run's, unless ``resumed``: a later run under the same run
        name must not start from an earlier run's local layers, but a run that
        resumes a killed one (a new Flower run id, the same run folder) must,
        or its gates lose their local layers and log-prior offset.
        """
        if not (self.folder / f"{key}.pt").exists():
            return None
        blob = self._load(f"{key}.pt")
        return blob["state"] if resumed or blob["run-id"] == run_id else None

    @property
    def checkpoint_dir(self) -> Path:
        """``<run>/checkpoints/client-<id>``: the inference checkpoint of this client."""
        return client_checkpoint_dir(self.folder.parents[1], int(self.folder.name))


@dataclass(frozen=True)
class ClientEnv:
    """Everything a handler needs, derived from the Context once per message."""

    cfg: RunConfig
    partition_id: int
    store: ClientStore
    runtime: Runtime

    @classmethod
    def of(cls, context: Context) -> ClientEnv:
        """Parse the run config and the node config; fail with the missing key named.

        One code path for simulation and deployment: Flower's simulation sets
        ``partition-id`` and ``num-partitions`` itself; a SuperNode gets them
        (and optionally ``data-dir``, ``output-dir`` for its own disk) from
        ``--node-config``.
        """
        cfg = parse_run_config(context.run_config)
        node = context.node_config
        missing = [k for k in (NODE_PARTITION_ID, NODE_NUM_PARTITIONS) if k not in node]
        if missing:
            raise ValueError(
                f"node_config lacks {', '.join(missing)}; start the SuperNode with "
                f'--node-config "partition-id=<i> num-partitions={cfg.num_clients}" '
                f"(optional keys: {NODE_DATA_DIR}, {NODE_OUTPUT_DIR})"
            )
        local = {
            field: str(node[key])
            for key, field in ((NODE_DATA_DIR, "data_dir"), (NODE_OUTPUT_DIR, "output_dir"))
            if key in node
        }
        if local:
            cfg = cfg.model_copy(update=local)
        pid, n = int(node[NODE_PARTITION_ID]), int(node[NODE_NUM_PARTITIONS])
        if n != cfg.num_clients or not 0 <= pid < n:
            raise ValueError(
                f"node has partition-id={pid}, num-partitions={n} but the run config says "
                f"num-clients={cfg.num_clients}; simulate with --federation-config "
                f'"num-supernodes={cfg.num_clients}"'
            )
        set_torch_threads(cfg.torch_threads)
        run = run_dir(cfg.output_dir, cfg.run_name, context.run_id)
        store = ClientStore(client_dir(run, pid))
        return cls(cfg, pid, store, resolve_runtime(cfg.device, cfg.amp, cfg.channels_last))

    def splits(self) -> ClientSplits:
        """This client's train/test data (partitioned once, then read from its disk).

        A pure function of the config: every node computes the same
        partition and keeps its own part, so no index lists travel.
        """
        return self.store.splits(
            lambda: all_client_splits(self.cfg, cache_dir(self.cfg.output_dir), clients=[self.partition_id])[0]
        )

    def pixel_stats(self, split: ClientSplits) -> PixelStats:
        """The pixel statistics every client's extractor normalises with."""
        return pixel_stats_for(self.cfg.dataset, self.cfg.hf_dataset, int(split.train.images.shape[1]))

    def seed(self, *parts: object) -> int:
        """A seed private to this client and purpose."""
        return derive_seed(self.cfg.seed, self.partition_id, *parts)


def received_state(model: nn.Module, record: ArrayRecord) -> dict[str, Tensor]:
    """The entries the server sent, as ``model``'s named tensors (unpacked if it packed them,
    :func:`~nmoe_flwr.records.pack`)."""
    state = from_record(record)
    return unpack(state, model.state_dict()) if is_packed(state) else state


def load_partial(
    model: nn.Module,
    shared: ArrayRecord,
    context: Context | None = None,
    state_key: str = "",
    store: ClientStore | None = None,
    resumed: bool = False,
) -> dict[str, Tensor]:
    """Load the server's entries over ``model``, then this client's local ones
    kept in ``context.state[state_key]`` (if a context is given and it has any yet),
    else those ``store`` kept for this run (a SuperNode restarted after a crash
    has an empty ``context.state`` but the same disk and run), or, if
    ``resumed``, for the killed run this one continues (:meth:`ClientStore.local`).
    Where both have an entry the server's wins: a stale local file can never
    override what the server sent.

    Returns
    -------
    dict[str, Tensor]
        The local entries found (empty if none): callers that ask what stage 1
        left locally read them here instead of from disk a second time.

    Raises
    ------
    ValueError
        If the server sent entries the model does not have.
    """
    received = received_state(model, shared)
    local: dict[str, Tensor] = {}
    if context is not None and state_key in context.state:
        local = from_record(context.state[state_key])
    elif store is not None and context is not None:
        local = store.local(state_key, context.run_id, resumed) or {}
    unknown = set(received) - set(model.state_dict())
    if unknown:
        raise ValueError(f"server sent unknown parameters {sorted(unknown)[:5]}")
    model.load_state_dict({**model.state_dict(), **local, **received})
    return local


def split_partial(
    model: nn.Module,
    prefixes: Sequence[str],
    context: Context,
    state_key: str,
    store: ClientStore | None = None,
    packed: bool = False,
) -> ArrayRecord:
    """Keep the entries outside ``prefixes`` in ``context.state`` (and in ``store``,
    if given, so they survive the node); return the shared ones (packed, as the
    server sent them, if ``packed``)."""
    state = model.state_dict()
    shared = state_subset(state, prefixes)
    local = {k: v for k, v in state.items() if k not in shared}
    context.state[state_key] = to_record(local)
    if store is not None and local:
        store.save_local(state_key, context.run_id, local)
    return to_record(pack(shared) if packed else shared)
