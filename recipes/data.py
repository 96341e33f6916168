"""``ImageDataModule``: classification data with timm's transforms and DDP-correct samplers.

Transforms follow the model's pretrained cfg (input size, crop_pct, interpolation, mean/std — any of which can be
overridden) with the DeiT-style training pipeline: RandomResizedCrop, flip, RandAugment ``rand-m9-mstd0.5-inc1`` and
random erasing 0.25 (RandAugment's 0-bit posterize gives the all-black image of Pillow < 13 on every Pillow,
see :mod:`.posterize`). Samplers are built from the trainer's rank and world size (the CLI sets
``use_distributed_sampler=False``): repeated augmentation for training, padded shards plus a real/padding flag for
evaluation so that DDP metrics count every image exactly once.

Classes: the training split fixes the class map (class name -> label), which the data module keeps in its state (so
in every checkpoint, and :class:`~attnzoo.recipes.callbacks.ExportWeights` writes it as ``label_names``). Evaluation
splits are labelled with it, in ``fit`` and, after Lightning restored it from ``--ckpt_path``, in ``validate`` /
``test`` / ``predict``; a folder split with classes training did not have is an error (never dropped in silence),
and a split may lack some of the training classes.

Augmentation: every training draw runs its random transform under its own seed, a function of (``seed``, epoch,
position in the epoch) (:class:`~attnzoo.recipes.samplers.SeededDataset`), so a resumed run sees the same augmented
images as an uninterrupted one, with any number of workers.

Multi-aspect training (``aspect_ratio_bins``): every training image goes to the nearest target width/height ratio,
is cropped and resized to that bin's size (about the area of ``input_size``), and the batches are drawn by
:class:`~attnzoo.recipes.samplers.AspectRatioBatchSampler`, so that each batch has one shape. Evaluation is unchanged.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import timm.data
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from .datasets import build_dataset, dataset_class_names, dataset_num_classes
from .loaders import LazyIterLoader, RankAwareDataModule
from .posterize import patch_posterize
from .samplers import (
    AspectRatioBatchSampler,
    RepeatedAugSampler,
    SeededDataset,
    check_aspect_ratio_bins,
    nearest_aspect_bin,
)

__all__ = ["AspectBinDataset", "ImageDataModule", "aspect_bin_size", "image_sizes"]

# Lightning warns about any mid-epoch resume with a DataLoader that is not `_Stateful`; the train sampler here
# resumes from the restored global step instead (see `ImageDataModule._batches_done`).
_RESUME_WARNING = "You're resuming from a checkpoint that ended before the epoch ended"
_SIZE_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _item_size(dataset: Dataset, index: int) -> tuple[int, int]:
    image = dataset[index][0]
    if not isinstance(image, Image.Image):
        raise TypeError(
            f"aspect_ratio_bins needs untransformed PIL images from the dataset, got {type(image).__name__}"
        )
    return image.size


def _header_size(reader, index: int) -> tuple[int, int]:
    """``(width, height)`` of item ``index`` of a timm reader, from the image header (no pixel decoding)."""
    item = reader[index][0]
    if isinstance(item, Image.Image):
        return item.size
    with item, Image.open(item) as image:
        return image.size


def _base_sizes(dataset: Dataset, indices: list[int], num_threads: int) -> list[tuple[int, int]]:
    reader = getattr(dataset, "reader", None)
    if reader is not None:  # timm ImageDataset (folder or tar): header reads, I/O bound, hence threads
        with ThreadPoolExecutor(max(1, num_threads)) as pool:
            return list(pool.map(lambda i: _header_size(reader, i), indices))
    for name in ("images", "data"):  # one stacked array (embedded digits, torchvision CIFAR/MNIST): one size
        array = getattr(dataset, name, None)
        if getattr(array, "ndim", 0) >= 3 and len(array) == len(dataset):
            return [_item_size(dataset, indices[0])] * len(indices) if indices else []
    return [_item_size(dataset, i) for i in indices]  # anything else: decode every item (slow)


def image_sizes(dataset: Dataset, num_threads: int = 8) -> torch.Tensor:
    """``(width, height)`` of every image of an untransformed map-style dataset, ``(N, 2)`` int64, cached per
    dataset object.

    timm folder/tar datasets: one header read per image (``PIL.Image.open(...).size`` reads no pixels; on
    ImageNet-1k's 1.28 M training files this takes minutes on a local disk, on ``num_threads`` threads); datasets
    holding one stacked array (``images`` / ``data``): the first image's size for all; any other dataset decodes
    every item (its ``transform`` must be ``None``). ``Subset`` wrappers only read their own indices.
    """
    if isinstance(dataset, IterableDataset):
        raise TypeError("aspect_ratio_bins needs a map-style training dataset, not an iterable one")
    if dataset not in _SIZE_CACHE:
        base, indices = dataset, list(range(len(dataset)))
        while isinstance(base, Subset):
            base, indices = base.dataset, [int(base.indices[i]) for i in indices]
        _SIZE_CACHE[dataset] = torch.tensor(_base_sizes(base, indices, num_threads), dtype=torch.int64).view(-1, 2)
    return _SIZE_CACHE[dataset]


def aspect_bin_size(input_size: Sequence[int], ratio: float, multiple: int = 32) -> tuple[int, int]:
    """``(height, width)`` of width/height ``ratio`` with about the area of ``input_size`` ``(..., H, W)``, both
    sides rounded to a multiple of ``multiple`` (at least one multiple)."""
    area = input_size[-2] * input_size[-1]

    def rounded(side: float) -> int:
        return max(multiple, round(side / multiple) * multiple)

    return rounded(math.sqrt(area / ratio)), rounded(math.sqrt(area * ratio))


class AspectBinDataset(Dataset):
    """An untransformed dataset (items ``(PIL image, target)``) whose item ``i`` gets the transform of its aspect
    bin: ``(transforms[bin_ids[i]](image), target)``; ``aspect_ratios`` ``(N,)`` holds every image's width/height."""

    def __init__(self, dataset: Dataset, bins: Sequence[float], transforms: Sequence[Callable], num_threads: int = 8):
        if len(transforms) != len(bins):
            raise ValueError(f"need one transform per bin: {len(bins)} bins, {len(transforms)} transforms")
        sizes = image_sizes(dataset, num_threads).double()
        self.dataset, self.transforms = dataset, list(transforms)
        self.aspect_ratios = sizes[:, 0] / sizes[:, 1]
        self.bin_ids = nearest_aspect_bin(self.aspect_ratios, bins).tolist()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, target = self.dataset[index]
        return self.transforms[self.bin_ids[index]](image), target


class ImageDataModule(RankAwareDataModule):
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
        aspect_ratio_bins: target width/height ratios for multi-aspect training (e.g. ``[0.75, 1.0, 1.333]``), for
            models that accept any input size; ``None`` (default) trains at ``input_size``. Each training image goes
            to the nearest ratio (image sizes read once from the headers on ``num_workers`` threads, on every rank,
            see :func:`image_sizes`) and is cropped to that bin's size (:func:`aspect_bin_size`; the crop ratio
            range ``ratio`` scaled by the bin's ratio; ``augment=False``: the evaluation transform at that size);
            every batch comes from one bin (:class:`~attnzoo.recipes.samplers.AspectRatioBatchSampler`, every image
            at least once per epoch). ``num_repeats`` must then be 1. Ratios lie in ``[1/8, 8]``.
        aspect_ratio_multiple: both sides of a bin's size are multiples of this (the model's total stride).
        num_train_samples, num_eval_samples: keep only the first images of each split (quick runs).
        download: let torchvision datasets download (needs network).
        seed: seed of the shuffle (epoch ``e`` uses ``seed + e``) and of the per-draw augmentation seeds.

    Attributes:
        class_names: the training classes in label order (``None`` until known: set by ``setup("fit")`` or
            restored from a checkpoint; ``None`` for datasets that do not name their classes).
        num_classes: the number of training classes (or of the evaluated split when no training classes are known).
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
        aspect_ratio_bins: Sequence[float] | None = None,
        aspect_ratio_multiple: int = 32,
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
        if aspect_ratio_bins is not None:
            check_aspect_ratio_bins(aspect_ratio_bins)
            if num_repeats != 1:
                raise ValueError(f"aspect_ratio_bins needs num_repeats=1, got num_repeats={num_repeats}")
        if aspect_ratio_multiple < 1:
            raise ValueError(f"aspect_ratio_multiple must be >= 1, got {aspect_ratio_multiple}")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.datasets: dict[str, Dataset] = {}
        self.class_names: list[str] | None = None
        self.num_classes: int | None = None
        self._eval_splits: dict[str, str] = {}
        self._train_sampler: RepeatedAugSampler | AspectRatioBatchSampler | None = None

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
        model = getattr(getattr(self.trainer, "lightning_module", None), "model", None)
        if isinstance(model, torch.nn.Module):
            return timm.data.resolve_data_config(overrides, model=model)
        return timm.data.resolve_data_config(overrides)

    def train_transform(self, config: dict, aspect_ratio: float = 1.0):
        """timm's training transform at ``config["input_size"]``; the random crop's width/height range is ``ratio``
        times ``aspect_ratio`` (the output's own ratio in multi-aspect training)."""
        hp = self.hparams
        if not hp.augment:
            return timm.data.create_transform(**config, is_training=False)
        transform = timm.data.create_transform(
            input_size=config["input_size"],
            is_training=True,
            scale=tuple(hp.scale),
            ratio=(hp.ratio[0] * aspect_ratio, hp.ratio[1] * aspect_ratio),
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
        return patch_posterize(transform)  # 0-bit posterize raises on Pillow >= 13 (see .posterize)

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
        if stage == "fit":
            config = self.data_config()
            transform = None if hp.aspect_ratio_bins else self.train_transform(config)
            train = self._build(hp.train_split, transform, training=True)
            self.class_names = dataset_class_names(train)
            self.num_classes = dataset_num_classes(train)
            self._check_num_classes(self.num_classes, f"the training split {hp.train_split!r}", self.class_names)
            self.datasets["train"] = self._aspect_bins(train, config) if hp.aspect_ratio_bins else train
        self._eval_splits = {
            "fit": {"val": hp.val_split},
            "validate": {"val": hp.val_split},
            "test": {"test": hp.test_split or hp.val_split},
            "predict": {"predict": hp.test_split or hp.val_split},
        }[stage]
        for key in self._eval_splits:  # built on first use, after Lightning restored a checkpoint's class map
            self.datasets.pop(key, None)

    def state_dict(self) -> dict:
        """``{"class_names": [...]}``: the training classes in label order (saved in every checkpoint)."""
        return {"class_names": list(self.class_names)} if self.class_names is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the training classes of a checkpoint; ValueError when this run's training split has others."""
        names = state_dict.get("class_names")
        if names is None:
            return
        if self.class_names is not None and list(names) != self.class_names:
            added, missing = sorted(set(self.class_names) - set(names)), sorted(set(names) - set(self.class_names))
            raise ValueError(
                f"the training split's classes differ from the checkpoint's (new: {added[:10]}, gone: {missing[:10]}"
                f"{', same names in another order' if not added and not missing else ''}); resume with the same "
                "training data, or fine-tune from the checkpoint's weights with model.pretrained"
            )
        self.class_names, self.num_classes = list(names), len(names)
        for key in self._eval_splits:
            self.datasets.pop(key, None)

    def eval_dataset(self, key: str) -> Dataset:
        """The ``"val"``, ``"test"`` or ``"predict"`` dataset of the current stage, labelled with the training
        classes when they are known (built on first use)."""
        if key not in self._eval_splits:
            raise ValueError(f"no {key!r} split in this stage; setup() prepared {sorted(self._eval_splits)}")
        if key not in self.datasets:
            split = self._eval_splits[key]
            transform = timm.data.create_transform(**self.data_config(), is_training=False)
            names = self.class_names
            class_map = {name: i for i, name in enumerate(names)} if names is not None else None
            dataset = self._build(split, transform, class_map=class_map)
            split_names = dataset_class_names(dataset)
            if names is not None and split_names is not None and split_names != names:
                raise ValueError(
                    f"split {split!r} labels its classes differently from training: {split_names[:10]} vs the "
                    f"training classes {names[:10]}"
                )
            if names is None:
                self.num_classes = dataset_num_classes(dataset)
                self._check_num_classes(self.num_classes, f"split {split!r}", split_names, evaluating=True)
            self.datasets[key] = dataset
        return self.datasets[key]

    def _check_num_classes(
        self, num_classes: int | None, what: str, names: list[str] | None, evaluating: bool = False
    ) -> None:
        """ValueError when the attached model's ``num_classes`` differs from the data's, saying which to change."""
        outputs = getattr(getattr(self.trainer, "lightning_module", None), "num_classes", None)
        if num_classes is None or outputs is None or num_classes == outputs:
            return
        listed = f" ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})" if names else ""
        message = f"{what} has {num_classes} classes{listed} but the model has {outputs} outputs"
        if evaluating:
            raise ValueError(
                f"{message}, and no training class map is known to label it. If this split lacks some of the "
                "training classes, evaluate the training checkpoint (--ckpt_path), which stores its class map; "
                f"if the model really has {num_classes} classes, set model.num_classes: {num_classes}"
            )
        raise ValueError(f"{message}; set model.num_classes: {num_classes}")

    def _aspect_bins(self, train: Dataset, config: dict) -> AspectBinDataset:
        hp = self.hparams
        transforms = []
        for ratio in hp.aspect_ratio_bins:
            size = aspect_bin_size(config["input_size"], ratio, hp.aspect_ratio_multiple)
            transforms.append(self.train_transform({**config, "input_size": (config["input_size"][0], *size)}, ratio))
        return AspectBinDataset(train, hp.aspect_ratio_bins, transforms, num_threads=hp.num_workers)

    # ------------------------------------------------------------------ loaders
    def _train_batches_per_epoch(self) -> int:
        batches = len(self._train_sampler)
        return batches // self.batch_size if isinstance(self._train_sampler, RepeatedAugSampler) else batches

    def train_dataloader(self) -> DataLoader:
        dataset = self.datasets["train"]
        rank, world = self._rank_world()
        warnings.filterwarnings("ignore", message=_RESUME_WARNING)
        generator = torch.Generator().manual_seed(self.hparams.seed + 1000 * rank)
        if isinstance(dataset, AspectBinDataset):
            self._train_sampler = AspectRatioBatchSampler(
                dataset.aspect_ratios,
                self.hparams.aspect_ratio_bins,
                self.batch_size,
                rank,
                world,
                seed=self.hparams.seed,
                resume_fn=self._batches_done,
                seeded=True,
            )
            return LazyIterLoader(
                SeededDataset(dataset), batch_sampler=self._train_sampler, generator=generator, **self._loader_kwargs()
            )
        self._train_sampler = RepeatedAugSampler(
            len(dataset),
            rank,
            world,
            num_repeats=self.hparams.num_repeats,
            shuffle=True,
            seed=self.hparams.seed,
            batch_size=self.batch_size,
            resume_fn=self._batches_done,
            seeded=True,
        )
        if len(self._train_sampler) < self.batch_size:
            raise ValueError(
                f"the training split has {len(dataset)} images: fewer than one batch of {self.batch_size} per "
                f"device on {world} device(s)"
            )
        return LazyIterLoader(
            SeededDataset(dataset),
            batch_size=self.batch_size,
            sampler=self._train_sampler,
            drop_last=True,
            generator=generator,
            **self._loader_kwargs(),
        )
