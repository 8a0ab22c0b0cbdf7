"""In-memory tensors served a batch at a time.

``TensorDataset`` + the default collate fetch every sample separately and stack them again: for a
batch of 256 small rows that is 256 indexing calls and a ``torch.stack`` per tensor, which costs
more than the MLP step it feeds. ``TensorTable.__getitems__`` (the batched-fetch protocol of
``torch.utils.data``) indexes each tensor once with the whole index list instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import TensorDataset


class TensorTable(TensorDataset):
    """A ``TensorDataset`` that fetches whole batches with one indexing operation per tensor.

    Use :func:`batch_collate` as the loader's ``collate_fn``: the fetched batch is already stacked.
    """

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return tuple(tensor[index] for tensor in self.tensors)


def batch_collate(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Collate for :class:`TensorTable` loaders: the batch arrives stacked; pass it through."""
    return batch


def collate_for(dataset: object) -> Callable[..., Any] | None:
    """The collate function a loader over ``dataset`` needs (``None``: PyTorch's default)."""
    return batch_collate if isinstance(dataset, TensorTable) else None
