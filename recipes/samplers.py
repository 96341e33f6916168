"""Distributed samplers built from the trainer's rank and world size (the recipe runs with
``use_distributed_sampler=False``, so Lightning does not replace them).

- :class:`RepeatedAugSampler`: DeiT's repeated augmentation (every image appears ``num_repeats`` times per epoch, its
  copies on different ranks); ``num_repeats=1`` is a plain shuffled distributed sampler. It resumes mid-epoch: its
  ``resume_fn`` says how many batches of the epoch were already trained (from the restored step counter).
- :class:`AspectRatioBatchSampler`: batches whose images all fall in one aspect-ratio bin (multi-aspect training of
  any-size models), dealt to the ranks from one global per-epoch batch list; resumable like the sampler above.
- :class:`ShardedEvalSampler`: strided shards of an evaluation set padded to a multiple of the world size, so every
  rank runs the same number of batches; :class:`PaddedEvalDataset` marks the padded copies so that metrics skip them.

With ``seeded=True`` the training samplers yield ``(index, seed)`` pairs instead of indices: ``seed`` is
``draw_seeds(seed, epoch, ...)[position]`` for the draw's position in the epoch's global (all-rank) order, and
:class:`SeededDataset` runs the random augmentation of that draw under it. The augmentation then depends only on
(seed, epoch, position), not on the worker, the number of workers or where a run was resumed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

__all__ = [
    "AspectRatioBatchSampler",
    "PaddedEvalDataset",
    "RepeatedAugSampler",
    "SeededDataset",
    "ShardedEvalSampler",
    "check_aspect_ratio_bins",
    "check_aspect_ratios",
    "draw_seeds",
    "nearest_aspect_bin",
]


MAX_BIN_RATIO = 8.0  # aspect_ratio_bins lie in [1 / MAX_BIN_RATIO, MAX_BIN_RATIO]


def draw_seeds(seed: int, epoch: int, shape: int | tuple[int, ...]) -> torch.Tensor:
    """Augmentation seeds (``shape``, int64 in ``[0, 2**62)``) of the draws of one epoch, a function of ``seed`` and
    ``epoch`` only; the sampler gives position ``p`` of the epoch's global order ``seeds.flatten()[p]``."""
    generator = torch.Generator().manual_seed(hash((seed, epoch, 0x5EED)) & (2**63 - 1))  # int tuples hash the same
    return torch.randint(0, 2**62, (shape,) if isinstance(shape, int) else shape, generator=generator)


class SeededDataset(Dataset):
    """Item ``(index, seed)`` is ``dataset[index]`` computed with the torch, ``random`` and NumPy global generators
    seeded from ``seed`` (timm's transforms draw from all three), so a random augmentation is the same in any
    worker; the caller's generator states are restored afterwards. A plain ``index`` reads ``dataset[index]``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]):
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, seed = key
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


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
    ``seeded=True`` yields ``(index, seed)`` pairs for :class:`SeededDataset` (see :func:`draw_seeds`).
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
        seeded: bool = False,
    ) -> None:
        _check_rank(rank, world_size)
        if num_repeats < 1:
            raise ValueError(f"num_repeats must be >= 1, got {num_repeats}")
        if dataset_len < 1:
            raise ValueError("the training dataset is empty")
        self.dataset_len, self.rank, self.world_size = dataset_len, rank, world_size
        self.num_repeats, self.shuffle, self.seed = num_repeats, shuffle, seed
        self.num_samples = math.ceil(dataset_len / world_size)
        self.batch_size, self.resume_fn, self.seeded = batch_size, resume_fn, seeded
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before every epoch; the order of epoch ``e`` depends only on ``seed + e``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
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
        if not self.seeded:
            return iter(indices[start:].tolist())
        seeds = draw_seeds(self.seed, self.epoch, total)[self.rank : total : self.world_size][: self.num_samples]
        return zip(indices[start:].tolist(), seeds[start:].tolist())


def check_aspect_ratios(
    values: Sequence[float] | torch.Tensor, name: str, distinct: bool = False, max_ratio: float | None = None
) -> torch.Tensor:
    """``values`` as a float64 tensor ``(N,)``; ValueError naming ``name`` unless it is a non-empty 1-D sequence of
    finite positive ratios (with ``distinct``, without repeats; with ``max_ratio``, each in
    ``[1 / max_ratio, max_ratio]``)."""
    ratios = torch.as_tensor(values, dtype=torch.float64)
    if ratios.ndim != 1 or len(ratios) == 0:
        raise ValueError(
            f"{name} must be a non-empty 1-D sequence of width/height ratios, got shape {tuple(ratios.shape)}"
        )
    if not bool(torch.isfinite(ratios).all() and (ratios > 0).all()):
        raise ValueError(f"{name} must hold finite positive width/height ratios, got {ratios.tolist()[:8]}")
    if max_ratio is not None and not bool(((ratios >= 1 / max_ratio) & (ratios <= max_ratio)).all()):
        raise ValueError(
            f"{name} must hold width/height ratios in [1/{max_ratio:g}, {max_ratio:g}], got {ratios.tolist()[:8]}"
        )
    if distinct and len(set(ratios.tolist())) != len(ratios):
        raise ValueError(f"{name} must be distinct, got {ratios.tolist()}")
    return ratios


def check_aspect_ratio_bins(bins: Sequence[float], name: str = "aspect_ratio_bins") -> torch.Tensor:
    """The target ratios of multi-aspect training: distinct width/height ratios in ``[1/8, 8]`` (:data:`MAX_BIN_RATIO`;
    beyond that a bin's crops become absurd strips: ``1e9`` gave 32 x 1,011,936 px crops)."""
    return check_aspect_ratios(bins, name, distinct=True, max_ratio=MAX_BIN_RATIO)


def nearest_aspect_bin(aspect_ratios: Sequence[float] | torch.Tensor, bins: Sequence[float]) -> torch.Tensor:
    """Bin index ``(N,)`` int64 of every ratio in ``aspect_ratios`` ``(N,)``: the nearest of the target ratios
    ``bins`` ``(K,)`` in log ratio (so 3/4 and 4/3 are equally far from 1; ties go to the earlier bin)."""
    ratios = check_aspect_ratios(aspect_ratios, "aspect_ratios")
    targets = check_aspect_ratios(bins, "bins", distinct=True)
    return (ratios.log()[:, None] - targets.log()[None, :]).abs().argmin(dim=1)


class AspectRatioBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` dataset indices whose samples all lie in one aspect-ratio bin, for one rank.

    Every sample goes to the nearest target ratio of ``bins`` (:func:`nearest_aspect_bin`; ``aspect_ratios[i]`` is
    the width / height of sample ``i``). An epoch's batch list is built once for all ranks from ``seed + epoch``
    (:meth:`set_epoch`): each bin is shuffled and cut into batches, the batches of all bins are shuffled together,
    and batch ``k`` goes to rank ``k % world_size``, so every rank runs the same number of batches and no sample is
    on two ranks unless it was padded. ``shuffle=False`` keeps the dataset order inside each bin and the bins in
    order.

    - ``drop_last=False``: a bin's last partial batch is completed by wrapping around to the start of that bin's
      order, and when the number of batches is not a multiple of ``world_size`` the first batches of the list are
      dealt again: every sample is seen at least once per epoch, fewer than ``batch_size`` per bin plus
      ``world_size - 1`` batches twice.
    - ``drop_last=True``: partial batches and the last ``num_batches % world_size`` batches of the shuffled list
      are dropped: every sample at most once per epoch.

    ``resume_fn(epoch)``, when given, returns the number of batches of ``epoch`` this rank already trained; the
    iteration then starts after them (asked at every ``iter``, i.e. after Lightning restored a checkpoint). Use it
    as ``DataLoader(dataset, batch_sampler=...)``; ``len()`` is the number of batches per rank. ``seeded=True``
    yields batches of ``(index, seed)`` pairs for :class:`SeededDataset` (see :func:`draw_seeds`).
    """

    def __init__(
        self,
        aspect_ratios: Sequence[float] | torch.Tensor,
        bins: Sequence[float],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        resume_fn: Callable[[int], int] | None = None,
        seeded: bool = False,
    ) -> None:
        _check_rank(rank, world_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.bin_ids = nearest_aspect_bin(aspect_ratios, bins)
        self.members = [(self.bin_ids == b).nonzero().flatten() for b in range(len(bins))]
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.shuffle, self.seed, self.drop_last, self.resume_fn = shuffle, seed, drop_last, resume_fn
        self.seeded = seeded
        rounding = math.floor if drop_last else math.ceil
        self.num_batches = sum(rounding(len(m) / batch_size) for m in self.members)  # over all ranks, unpadded
        self.batches_per_rank = rounding(self.num_batches / world_size)
        if self.batches_per_rank == 0:
            raise ValueError(
                f"drop_last=True leaves no batch: {self.num_batches} full batches of {batch_size} for {world_size} "
                f"rank(s) (bin sizes {[len(m) for m in self.members]})"
            )
        self.epoch = 0

    @property
    def sampler(self) -> AspectRatioBatchSampler:
        """Itself: Lightning calls ``set_epoch`` on ``dataloader.batch_sampler.sampler``."""
        return self

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before every epoch; the batches of epoch ``e`` depend only on ``seed + e``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_rank

    def _bin_batches(self, members: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The batches ``(n, batch_size)`` of one bin (padded by wrap-around, or its partial batch dropped)."""
        if generator is not None:
            members = members[torch.randperm(len(members), generator=generator)]
        rounding = math.floor if self.drop_last else math.ceil
        size = rounding(len(members) / self.batch_size) * self.batch_size
        return members[torch.arange(size) % max(len(members), 1)].view(-1, self.batch_size)

    def global_batches(self) -> torch.Tensor:
        """All ranks' batches of the current epoch ``(batches_per_rank * world_size, batch_size)``; row ``k`` goes
        to rank ``k % world_size``."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch) if self.shuffle else None
        batches = torch.cat([self._bin_batches(m, generator) for m in self.members])
        if generator is not None:
            batches = batches[torch.randperm(len(batches), generator=generator)]
        total = self.batches_per_rank * self.world_size
        return batches[torch.arange(total) % len(batches)]

    def __iter__(self) -> Iterator[list[int]] | Iterator[list[tuple[int, int]]]:
        # a generator, so the batches are built at the first ``next``: on resume Lightning creates the iterator
        # before it calls ``set_epoch``
        start = self.resume_fn(self.epoch) if self.resume_fn is not None else 0
        batches = self.global_batches()
        mine = batches[self.rank :: self.world_size][start:].tolist()
        if not self.seeded:
            yield from mine
            return
        seeds = draw_seeds(self.seed, self.epoch, tuple(batches.shape))[self.rank :: self.world_size][start:].tolist()
        for batch, batch_seeds in zip(mine, seeds):
            yield list(zip(batch, batch_seeds))


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
