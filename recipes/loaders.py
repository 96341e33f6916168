"""Loader plumbing shared by the classification, detection and segmentation data modules: rank-aware samplers,
mid-epoch resume, the sharded evaluation loaders."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from .samplers import PaddedEvalDataset, ShardedEvalSampler

__all__ = ["LazyIterLoader", "RankAwareDataModule"]


class LazyIterLoader(DataLoader):
    """A ``DataLoader`` whose iterator, and so its workers' index prefetch, starts at the first ``next``: Lightning
    creates the training iterator before it restores a checkpoint and calls ``set_epoch``, and prefetching workers
    would then draw the resumed epoch's indices from epoch 0 and batch 0."""

    def __iter__(self) -> Iterator:
        yield from super().__iter__()


class RankAwareDataModule(pl.LightningDataModule):
    """Base of data modules that build their samplers from the trainer's rank and world size and skip, on resume,
    the batches of the current epoch already trained. Subclasses set ``self._train_sampler`` (a batch sampler or a
    sampler) and ``self.eval_batch_size``, fill ``self.datasets`` (split name -> dataset) in ``setup`` or override
    :meth:`eval_dataset`, and have ``num_workers``, ``pin_memory`` and ``persistent_workers`` hyper-parameters.
    Evaluation (``val`` / ``test`` / ``predict``) shards the split over the ranks, padded to equal shares."""

    collate_fn: Callable | None = None  # the loaders' collate function (``None``: PyTorch's default)
    eval_collate_fn: Callable | None = None  # the evaluation loaders' (``None``: ``collate_fn``)
    _train_sampler = None

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _loader_kwargs(self) -> dict:
        hp = self.hparams
        kwargs = dict(
            num_workers=hp.num_workers,
            pin_memory=hp.pin_memory and torch.cuda.is_available(),
            persistent_workers=hp.persistent_workers and hp.num_workers > 0,
        )
        if self.collate_fn is not None:
            kwargs["collate_fn"] = self.collate_fn
        return kwargs

    def _train_batches_per_epoch(self) -> int:
        """Batches the training sampler yields per epoch (before ``limit_train_batches``)."""
        return len(self._train_sampler)

    def _batches_done(self, epoch: int) -> int:
        """Batches of ``epoch`` already trained, from the trainer's (restored) step counter: 0 unless resuming
        inside that epoch."""
        trainer = self.trainer
        if trainer is None or trainer.global_step == 0 or self._train_sampler is None:
            return 0
        batches = self._train_batches_per_epoch()
        limit = trainer.limit_train_batches
        if isinstance(limit, int):
            batches = min(batches, limit)
        elif limit is not None:
            batches = int(batches * limit)
        accumulate = trainer.accumulate_grad_batches
        steps_per_epoch = math.ceil(batches / accumulate)
        steps_done = trainer.global_step - epoch * steps_per_epoch
        return steps_done * accumulate if 0 < steps_done < steps_per_epoch else 0

    def eval_dataset(self, split: str) -> Dataset:
        """The ``"val"``, ``"test"`` or ``"predict"`` dataset prepared by ``setup``."""
        return self.datasets[split]

    def _eval_loader(self, split: str) -> DataLoader:
        rank, world = self._rank_world()
        padded = PaddedEvalDataset(self.eval_dataset(split), world)
        sampler = ShardedEvalSampler(len(padded), rank, world)
        kwargs = self._loader_kwargs()
        if self.eval_collate_fn is not None:
            kwargs["collate_fn"] = self.eval_collate_fn
        return DataLoader(padded, batch_size=self.eval_batch_size, sampler=sampler, **kwargs)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("predict")
