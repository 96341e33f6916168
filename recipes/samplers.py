"""Distributed samplers built from the trainer's rank and world size (the recipe runs with
``use_distributed_sampler=False``, so Lightning does not replace them).

- :class:`RepeatedAugSampler`: DeiT's repeated augmentation (every image appears ``num_repeats`` times per epoch, its
  copies on different ranks); ``num_repeats=1`` is a plain shuffled distributed sampler. It resumes mid-epoch: its
  ``resume_fn`` says how many batches of the epoch were already trained (from the restored step counter).
- :class:`ShardedEvalSampler`: strided shards of an evaluation set padded to a multiple of the world size, so every
  rank runs the same number of batches; :class:`PaddedEvalDataset` marks the padded copies so that metrics skip them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["PaddedEvalDataset", "RepeatedAugSampler", "ShardedEvalSampler"]


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")


class RepeatedAugSampler(Sampler[int]):
    """Each rank draws ``ceil(len(dataset) / world_size)`` indices per epoch from a seeded shuffle in which every
    index is repeated ``num_repeats`` times consecutively and the repeated list is dealt round-robin to the ranks
    (so the copies of one image land on different ranks, as in DeiT).

    ``resume_fn(epoch)``, when given, returns the number of batches of ``batch_size`` already trained in ``epoch``;
    iteration then starts after them (it is asked at every ``iter``, i.e. after Lightning restored a checkpoint).
    """

    def __init__(
        self,
        dataset_len: int,
        rank: int = 0,
        world_size: int = 1,
        num_repeats: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        batch_size: int = 1,
        resume_fn: Callable[[int], int] | None = None,
    ) -> None:
        _check_rank(rank, world_size)
        if num_repeats < 1:
            raise ValueError(f"num_repeats must be >= 1, got {num_repeats}")
        if dataset_len < 1:
            raise ValueError("the training dataset is empty")
        self.dataset_len, self.rank, self.world_size = dataset_len, rank, world_size
        self.num_repeats, self.shuffle, self.seed = num_repeats, shuffle, seed
        self.num_samples = math.ceil(dataset_len / world_size)
        self.batch_size, self.resume_fn = batch_size, resume_fn
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before every epoch; the order of epoch ``e`` depends only on ``seed + e``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_len, generator=generator)
        else:
            order = torch.arange(self.dataset_len)
        repeated = order.repeat_interleave(self.num_repeats)
        total = self.num_samples * self.world_size
        if total > len(repeated):  # pad by wrapping around so that every rank gets num_samples
            repeated = torch.cat([repeated, repeated[: total - len(repeated)]])
        indices = repeated[self.rank : total : self.world_size][: self.num_samples]
        start = self.resume_fn(self.epoch) * self.batch_size if self.resume_fn is not None else 0
        return iter(indices[start:].tolist())


class PaddedEvalDataset(Dataset):
    """``dataset`` padded to a multiple of ``world_size`` by repeating its first items; items are
    ``(image, target, is_real)`` with ``is_real=False`` on the padding."""

    def __init__(self, dataset: Dataset, world_size: int = 1) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.dataset = dataset
        self.real_len = len(dataset)
        if self.real_len == 0:
            raise ValueError("the evaluation dataset is empty")
        self.padded_len = math.ceil(self.real_len / world_size) * world_size

    def __len__(self) -> int:
        return self.padded_len

    def __getitem__(self, index: int):
        image, target = self.dataset[index % self.real_len]
        return image, target, index < self.real_len


class ShardedEvalSampler(Sampler[int]):
    """Rank ``r`` of ``world_size`` reads indices ``r, r + world_size, ...`` of a :class:`PaddedEvalDataset` in order:
    the same number on every rank and every real item exactly once over all ranks."""

    def __init__(self, padded_len: int, rank: int = 0, world_size: int = 1) -> None:
        _check_rank(rank, world_size)
        if padded_len % world_size:
            raise ValueError(f"padded_len {padded_len} is not a multiple of world_size {world_size}")
        self.padded_len, self.rank, self.world_size = padded_len, rank, world_size

    def __len__(self) -> int:
        return self.padded_len // self.world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.padded_len, self.world_size))
