"""What every hpctrain data module offers beyond Lightning's ``LightningDataModule``.

The command line relies on four things: :meth:`HpcDataModule.check` (cheap validation before any
compute), :meth:`HpcDataModule.data_identity` (for the result manifest),
:meth:`HpcDataModule.model_dims` (shapes the model cannot know from its config) and
:meth:`HpcDataModule.eval_dataloader` (the held-out evaluation of exported models).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from hpctrain.data.sampling import EpochShuffleSampler, ResumableLoader
from hpctrain.data.tensor_table import collate_for
from hpctrain.job import resolve_job_dir

Split = Literal["train", "val", "all"]


def global_seed(default: int = 0) -> int:
    """The run's seed as set by ``seed_everything`` (``PL_GLOBAL_SEED``), else ``default``."""
    value = os.environ.get("PL_GLOBAL_SEED", "")
    return int(value) if value.lstrip("-").isdigit() else default


class HpcDataModule(LightningDataModule):
    """Base class of the data modules the ``hpctrain`` command line accepts.

    :param batch_size: training batch size per process.
    :param eval_batch_size: batch size for validation and evaluation (default: ``batch_size``).
    :param num_workers: DataLoader worker processes per rank.
    :param shuffle_seed: seed of the per-epoch shuffle; default: the run's ``seed_everything``.
    :param cache_dir: where snapshots of remote sources are kept (default ``<job_dir>/data``), so
        a requeued job trains on exactly the data its first attempt read.
    """

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_seed: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_seed = shuffle_seed
        self._cache_dir = cache_dir
        # With a shared job directory one global rank 0 prepares (snapshots) the data.
        self.prepare_data_per_node = False
        # Filled by the subclass's setup(): the split datasets and the data identity.
        self._splits: dict[str, Dataset] = {}
        self._identity: dict[str, Any] | None = None

    @property
    def cache_dir(self) -> Path:
        return Path(self._cache_dir) if self._cache_dir else resolve_job_dir() / "data"

    @property
    def cache_dir_configured(self) -> bool:
        return self._cache_dir is not None

    def use_cache_dir(self, path: str | os.PathLike[str]) -> None:
        """Keep snapshots in ``path`` instead of the job directory (evaluation uses a fresh one)."""
        self._cache_dir = str(path)

    # -- what subclasses provide ---------------------------------------------------------
    def check(self) -> None:
        """Validate the source cheaply before any compute; raise :class:`~hpctrain.errors.ConfigError`."""

    def data_identity(self) -> dict[str, Any]:
        """Describe the data this module serves (call after :meth:`setup`)."""
        if self._identity is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run")
        return dict(self._identity)

    def model_dims(self) -> dict[str, Any]:
        """Shapes the model needs from the data (call after :meth:`setup`)."""
        return {}

    def dataset(self, split: Split) -> Dataset:
        """The dataset of one split (call after :meth:`setup`)."""
        if not self._splits:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run")
        return self._splits[split]

    # -- loaders ---------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset("train")
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = EpochShuffleSampler(
            dataset,
            num_replicas=world,
            rank=rank,
            shuffle=True,
            seed=self.shuffle_seed if self.shuffle_seed is not None else global_seed(),
        )
        return ResumableLoader(
            dataset,
            sampler,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def eval_dataloader(self, split: Split = "val") -> DataLoader:
        """A deterministic loader over one split, for validation and held-out evaluation.

        :param split: ``"val"`` (the validation split), ``"all"`` (every row: a held-out set given
            as its own source) or ``"train"``.
        """
        dataset = self.dataset(split)
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_for(dataset),
        )
