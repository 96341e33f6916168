"""``ImageDataModule``: classification data with timm's transforms and DDP-correct samplers.

Transforms follow the model's pretrained cfg (input size, crop_pct, interpolation, mean/std — any of which can be
overridden) with the DeiT-style training pipeline: RandomResizedCrop, flip, RandAugment ``rand-m9-mstd0.5-inc1`` and
random erasing 0.25. Samplers are built from the trainer's rank and world size (the CLI sets
``use_distributed_sampler=False``): repeated augmentation for training, padded shards plus a real/padding flag for
evaluation so that DDP metrics count every image exactly once.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import lightning.pytorch as pl
import timm.data
import torch
from torch.utils.data import DataLoader, Dataset

from .datasets import build_dataset, dataset_class_to_idx, dataset_num_classes
from .samplers import PaddedEvalDataset, RepeatedAugSampler, ShardedEvalSampler

__all__ = ["ImageDataModule"]

# Lightning warns about any mid-epoch resume with a DataLoader that is not `_Stateful`; the train sampler here
# resumes from the restored global step instead (see `ImageDataModule._resume_position`).
_RESUME_WARNING = "You're resuming from a checkpoint that ended before the epoch ended"


class ImageDataModule(pl.LightningDataModule):
    """Train / val / test / predict loaders for an image classification dataset.

    Args:
        dataset: ``""`` for the ImageNet folder layout under ``root``, a ``timm.data.create_dataset`` name
            (``"torch/cifar10"``...), or ``"embedded/mnist_5k"`` / ``"embedded/sklearn_digits"``.
        root: dataset folder (``<root>/train/<class>/*``, ``<root>/val/<class>/*`` for the folder layout).
        train_split, val_split, test_split: split names (``test_split`` defaults to ``val_split``).
        batch_size: images per device and step; the global batch is ``batch_size * world_size``.
        eval_batch_size: per-device batch for evaluation (default ``batch_size``).
        num_workers, pin_memory, persistent_workers: DataLoader settings.
        augment: the training pipeline; ``False`` uses the evaluation transform for training too.
        input_size, crop_pct, interpolation, mean, std: override the model's data config.
        auto_augment, re_prob, scale, ratio, hflip, color_jitter: timm ``create_transform`` training options.
        num_repeats: repeated augmentation (DeiT uses 3; 1 disables it).
        num_train_samples, num_eval_samples: keep only the first images of each split (quick runs).
        download: let torchvision datasets download (needs network).
        seed: seed of the shuffle (epoch ``e`` uses ``seed + e``).
    """

    def __init__(
        self,
        dataset: str = "",
        root: str | None = None,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 8,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        augment: bool = True,
        input_size: Sequence[int] | None = None,
        crop_pct: float | None = None,
        interpolation: str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        re_prob: float = 0.25,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        color_jitter: float = 0.4,
        num_repeats: int = 1,
        num_train_samples: int | None = None,
        num_eval_samples: int | None = None,
        download: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if num_repeats < 1:
            raise ValueError(f"num_repeats must be >= 1, got {num_repeats}")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.datasets: dict[str, Dataset] = {}
        self.num_classes: int | None = None
        self._train_sampler: RepeatedAugSampler | None = None

    # ------------------------------------------------------------------ transforms
    def data_config(self) -> dict:
        """timm data config: the model's pretrained cfg (when attached to a trainer) updated with the overrides."""
        hp = self.hparams
        overrides = {
            k: v
            for k, v in dict(
                input_size=tuple(hp.input_size) if hp.input_size else None,
                crop_pct=hp.crop_pct,
                interpolation=hp.interpolation,
                mean=tuple(hp.mean) if hp.mean else None,
                std=tuple(hp.std) if hp.std else None,
            ).items()
            if v is not None
        }
        model = getattr(self.trainer.lightning_module, "model", None) if self.trainer is not None else None
        if isinstance(model, torch.nn.Module):
            return timm.data.resolve_data_config(overrides, model=model)
        return timm.data.resolve_data_config(overrides)

    def train_transform(self, config: dict):
        hp = self.hparams
        if not hp.augment:
            return timm.data.create_transform(**config, is_training=False)
        return timm.data.create_transform(
            input_size=config["input_size"],
            is_training=True,
            scale=tuple(hp.scale),
            ratio=tuple(hp.ratio),
            hflip=hp.hflip,
            color_jitter=hp.color_jitter,
            auto_augment=hp.auto_augment,
            interpolation=config["interpolation"],
            mean=config["mean"],
            std=config["std"],
            re_prob=hp.re_prob,
            re_mode="pixel",
            re_count=1,
        )

    # ------------------------------------------------------------------ datasets
    def _build(self, split: str, transform, class_map=None, training: bool = False) -> Dataset:
        hp = self.hparams
        return build_dataset(
            hp.dataset,
            hp.root,
            split,
            transform,
            class_map=class_map,
            download=hp.download,
            num_samples=hp.num_train_samples if training else hp.num_eval_samples,
            is_training=training,
        )

    def setup(self, stage: str) -> None:
        hp = self.hparams
        config = self.data_config()
        eval_transform = timm.data.create_transform(**config, is_training=False)
        class_map = None
        if stage == "fit":
            self.datasets["train"] = self._build(hp.train_split, self.train_transform(config), training=True)
            class_map = dataset_class_to_idx(self.datasets["train"])
            self.num_classes = dataset_num_classes(self.datasets["train"])
        eval_splits = {
            "fit": {"val": hp.val_split},
            "validate": {"val": hp.val_split},
            "test": {"test": hp.test_split or hp.val_split},
            "predict": {"predict": hp.test_split or hp.val_split},
        }[stage]
        for key, split in eval_splits.items():
            self.datasets[key] = self._build(split, eval_transform, class_map=class_map)
            self.num_classes = self.num_classes or dataset_num_classes(self.datasets[key])

    # ------------------------------------------------------------------ loaders
    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _loader_kwargs(self) -> dict:
        hp = self.hparams
        return dict(
            num_workers=hp.num_workers,
            pin_memory=hp.pin_memory and torch.cuda.is_available(),
            persistent_workers=hp.persistent_workers and hp.num_workers > 0,
        )

    def _batches_done(self, epoch: int) -> int:
        """Batches of ``epoch`` already trained, from the trainer's (restored) step counter: 0 unless resuming
        inside that epoch."""
        trainer = self.trainer
        if trainer is None or trainer.global_step == 0 or self._train_sampler is None:
            return 0
        batches_per_epoch = len(self._train_sampler) // self.batch_size
        limit = trainer.limit_train_batches
        if isinstance(limit, int):
            batches_per_epoch = min(batches_per_epoch, limit)
        elif limit is not None:
            batches_per_epoch = int(batches_per_epoch * limit)
        accumulate = trainer.accumulate_grad_batches
        steps_per_epoch = math.ceil(batches_per_epoch / accumulate)
        steps_done = trainer.global_step - epoch * steps_per_epoch
        if not 0 < steps_done < steps_per_epoch:
            return 0
        return steps_done * accumulate

    def train_dataloader(self) -> DataLoader:
        dataset = self.datasets["train"]
        rank, world = self._rank_world()
        self._train_sampler = RepeatedAugSampler(
            len(dataset),
            rank,
            world,
            num_repeats=self.hparams.num_repeats,
            shuffle=True,
            seed=self.hparams.seed,
            batch_size=self.batch_size,
            resume_fn=self._batches_done,
        )
        if len(self._train_sampler) < self.batch_size:
            raise ValueError(
                f"the training split has {len(dataset)} images: fewer than one batch of {self.batch_size} per "
                f"device on {world} device(s)"
            )
        warnings.filterwarnings("ignore", message=_RESUME_WARNING)
        generator = torch.Generator().manual_seed(self.hparams.seed + 1000 * rank)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=self._train_sampler,
            drop_last=True,
            generator=generator,
            **self._loader_kwargs(),
        )

    def _eval_loader(self, key: str) -> DataLoader:
        rank, world = self._rank_world()
        padded = PaddedEvalDataset(self.datasets[key], world)
        sampler = ShardedEvalSampler(len(padded), rank, world)
        return DataLoader(padded, batch_size=self.eval_batch_size, sampler=sampler, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("predict")
