"""A training DataLoader whose position inside an epoch survives a checkpoint.

Lightning restores model, optimizer, scheduler and loop counters, but a plain ``DataLoader``
restarts its epoch from the first batch after a mid-epoch resume, so the resumed run trains on
different batches than the uninterrupted one would have. :class:`ResumableLoader` implements
Lightning's ``state_dict``/``load_state_dict`` loader protocol: the checkpoint records the epoch
and how many batches this loader has handed out, and the resumed loader skips exactly those
(indices only: skipped samples are never loaded).

The order comes from :class:`EpochShuffleSampler`, a ``DistributedSampler`` (so Lightning keeps
it instead of injecting its own under DDP) whose permutation depends only on ``seed`` and the
epoch number, never on the global RNG.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from hpctrain.data.tensor_table import collate_for


class EpochShuffleSampler(DistributedSampler):
    """Shuffle by ``(seed, epoch)``, shard over ranks, optionally start part-way into the epoch.

    :param dataset: the dataset to sample.
    :param num_replicas: world size (1 without DDP).
    :param rank: this process's global rank.
    :param shuffle: shuffle each epoch (the permutation is a pure function of seed and epoch).
    :param seed: the shuffling seed, shared by all ranks.
    :param drop_last: drop the tail that does not divide evenly over ranks instead of padding.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        self.start_index = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self.start_index = self.start_index, 0  # the offset applies to one pass only
        return iter(indices[start:])


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over an :class:`EpochShuffleSampler` that checkpoints its position.

    All ``DataLoader`` keyword arguments are accepted except ``sampler``/``shuffle``/
    ``batch_sampler`` (the sampler is the point of this class).

    :param dataset: the dataset.
    :param sampler: the epoch sampler that decides the order.
    :param kwargs: passed to ``DataLoader`` (``batch_size``, ``num_workers``, ...).
    """

    def __init__(self, dataset: Dataset, sampler: EpochShuffleSampler, **kwargs: Any) -> None:
        # An explicit generator keeps DataLoader from drawing its worker base seed from the
        # global RNG, which would otherwise differ between a resumed and an uninterrupted run.
        kwargs.setdefault("generator", torch.Generator().manual_seed(sampler.seed))
        kwargs.setdefault("collate_fn", collate_for(dataset))
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._yielded = 0
        self._resume_from: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing (not even the sampler permutation) is computed until the first
        # batch is requested, which Lightning does after it has called ``set_epoch``.
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        sampler: EpochShuffleSampler = self.sampler  # type: ignore[assignment]
        skip = 0
        if self._resume_from is not None:
            state, self._resume_from = self._resume_from, None
            if state["epoch"] == sampler.epoch:
                skip = state["batches"]
        if skip and self.batch_size is not None:
            sampler.start_index = skip * self.batch_size
        self._yielded = skip
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Position to resume from: epoch and batches already handed to the training loop."""
        return {"epoch": int(self.sampler.epoch), "batches": int(self._yielded)}  # type: ignore[attr-defined]

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Arrange for the next pass over ``state_dict['epoch']`` to skip the consumed batches."""
        self._resume_from = {"epoch": int(state_dict["epoch"]), "batches": int(state_dict["batches"])}
        self.sampler.set_epoch(int(state_dict["epoch"]))  # type: ignore[attr-defined]
