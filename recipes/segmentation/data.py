"""``SegmentationDataModule``: image folders + index-PNG masks (ADE20K or any layout), DDP-correct and resumable.

Layouts:

- ADE20K (``root``): ``<root>/images/{training,validation}/*.jpg`` and ``<root>/annotations/{training,validation}/
  *.png`` (``root`` is ``ADEChallengeData2016`` or its parent); ``reduce_zero_label``: label 0 ("other") becomes
  ``ignore_index`` and the 150 classes 1..150 become 0..149.
- Generic: ``{train,val,test}_images`` (image files) + ``{train,val,test}_masks`` (index PNGs with the same stems:
  one channel, ``L`` / ``P`` / ``I;16``, each pixel a class index or ``ignore_index``).
- ``predict_images``: any image folder (no masks).

A training batch is ``(images (B, 3, h, w) float in [0, 1], masks (B, h, w) int64)`` with ``(h, w)`` the crop size
(:class:`~.transforms.SegmentationTrainTransform`); an evaluation batch is ``(images, targets, is_real)`` with
tuples of ``(3, H, W)`` images at their file size and ``{"mask": (H, W) int64, "index": int}`` targets (the model
resizes to its test scale). Bad data stops with a ``ValueError`` naming the file: an image without its mask, a mask
of another size than its image, an RGB mask, mask values >= ``num_classes`` other than ``ignore_index``, an
unreadable file, an empty folder.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors

from ..detection.data import collate_detection
from ..loaders import LazyIterLoader, RankAwareDataModule
from ..samplers import RepeatedAugSampler, SeededDataset
from .classes import ADE20K_CLASSES
from .transforms import SegmentationTrainTransform

__all__ = ["IMAGE_EXTENSIONS", "SegmentationDataModule", "SegmentationFolder", "read_mask"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
INDEX_MODES = ("L", "P", "I", "I;16")  # single-channel PIL modes whose pixel values are class indices
_RESUME_WARNING = "You're resuming from a checkpoint that ended before the epoch ended"
_ADE_SPLITS = {"train": "training", "val": "validation", "test": "validation"}


def _open(path: Path, what: str) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except (OSError, SyntaxError, ValueError) as err:  # PIL: unidentified, truncated or corrupt files
        raise ValueError(f"cannot read {what} {path}: {err}") from err
    return image


def read_image(path: str | os.PathLike) -> tv_tensors.Image:
    """An image file as ``tv_tensors.Image`` ``(3, H, W)`` uint8 RGB."""
    image = _open(Path(path), "image").convert("RGB")
    return tv_tensors.Image(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))


def read_mask(
    path: str | os.PathLike, num_classes: int, ignore_index: int = 255, reduce_zero_label: bool = False
) -> tv_tensors.Mask:
    """An index mask as ``tv_tensors.Mask`` ``(H, W)`` int64 (``reduce_zero_label``: 0 -> ``ignore_index``, ``k`` ->
    ``k - 1``); ``ValueError`` naming the file for an RGB mask or values >= ``num_classes`` that are not
    ``ignore_index``."""
    path = Path(path)
    image = _open(path, "mask")
    if image.mode not in INDEX_MODES:
        raise ValueError(
            f"mask {path} is a {image.mode} image; masks must be index PNGs (one channel: mode L, P or I;16, each "
            "pixel a class index), not colour-coded"
        )
    mask = torch.from_numpy(np.asarray(image).astype(np.int64))
    if reduce_zero_label:
        mask = torch.where(mask == 0, ignore_index, mask - 1)
        mask[mask == ignore_index - 1] = ignore_index  # mmseg's rule: an original ignore_index stays ignored
    bad = (mask >= num_classes) & (mask != ignore_index) | (mask < 0)
    if bool(bad.any()):
        values = sorted(set(mask[bad].unique().tolist()))[:10]
        shift = " after reduce_zero_label" if reduce_zero_label else ""
        raise ValueError(
            f"mask {path} holds class values {values}{shift} outside [0, {num_classes}) that are not ignore_index "
            f"{ignore_index}; check num_classes, ignore_index and reduce_zero_label"
        )
    return tv_tensors.Mask(mask)


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ValueError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"image folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


class SegmentationFolder(Dataset):
    """Items ``(image, target)`` of the images of ``images_dir`` and the masks ``<masks_dir>/<stem>.png``:
    ``transform(image, mask)`` (training) or ``(image (3, H, W) float in [0, 1], {"mask": (H, W) int64, "index": i})``
    (``transform=None``; without ``masks_dir`` the target has no mask). Indices are dataset positions."""

    def __init__(
        self,
        images_dir: str | os.PathLike,
        masks_dir: str | os.PathLike | None,
        num_classes: int,
        ignore_index: int = 255,
        reduce_zero_label: bool = False,
        transform: SegmentationTrainTransform | None = None,
    ) -> None:
        self.images = _image_files(Path(images_dir))
        self.masks: list[Path] | None = None
        if masks_dir is not None:
            masks_dir = Path(masks_dir)
            if not masks_dir.is_dir():
                raise ValueError(f"mask folder {masks_dir} does not exist")
            self.masks = [masks_dir / f"{p.stem}.png" for p in self.images]
            missing = [(i, m) for i, m in zip(self.images, self.masks) if not m.is_file()]
            if missing:
                examples = "; ".join(f"{i} has no mask {m}" for i, m in missing[:3])
                raise ValueError(f"{len(missing)} of {len(self.images)} images have no mask: {examples}")
        self.num_classes, self.ignore_index, self.reduce_zero_label = num_classes, ignore_index, reduce_zero_label
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def names(self) -> list[str]:
        """File stems of the images, in dataset order."""
        return [p.stem for p in self.images]

    def load(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask | None]:
        """The image ``(3, H, W)`` uint8 and its mask ``(H, W)`` int64 (``None`` without masks), checked."""
        image = read_image(self.images[index])
        if self.masks is None:
            return image, None
        mask = read_mask(self.masks[index], self.num_classes, self.ignore_index, self.reduce_zero_label)
        if tuple(mask.shape) != tuple(image.shape[-2:]):
            raise ValueError(
                f"mask {self.masks[index]} is {mask.shape[1]}x{mask.shape[0]} px but its image {self.images[index]} "
                f"is {image.shape[2]}x{image.shape[1]} px"
            )
        return image, mask

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        image, mask = self.load(index)
        if self.transform is not None:
            if mask is None:
                raise ValueError("training needs masks (masks_dir)")
            return self.transform(image, mask)
        target: dict[str, Any] = {"index": index}
        if mask is not None:
            target["mask"] = mask.as_subclass(torch.Tensor)
        return image.as_subclass(torch.Tensor).float().div_(255), target


class SegmentationDataModule(RankAwareDataModule):
    """Train / val / test / predict loaders of a semantic segmentation set.

    Args:
        root: the ADE20K folder (``ADEChallengeData2016`` or its parent); sets the paths of train / val / test
            (test = validation), ``reduce_zero_label`` and the 150 class names unless given explicitly.
        train_images, train_masks, val_images, val_masks, test_images, test_masks: generic layout (test defaults
            to val); ``predict_images``: a folder to predict (default: the validation images).
        num_classes: classes (mask values ``0..num_classes-1``); must equal the model's.
        class_names: names for the per-class table and the rendered legend (default: ADE20K's with ``root``,
            else the class numbers).
        ignore_index: the mask value left out of the loss and the metrics (255).
        reduce_zero_label: map 0 to ``ignore_index`` and ``k`` to ``k - 1`` (``None``: true with ``root``).
        batch_size: crops per device and step; ``eval_batch_size``: images per device in evaluation (1: the images
            keep their own sizes).
        crop_size, scale, ratio_range, cat_max_ratio, hflip, photometric: the training augmentation
            (:class:`~.transforms.SegmentationTrainTransform`; mmseg's ADE20K pipeline by default).
        num_workers, pin_memory, persistent_workers: DataLoader settings.
        seed: seed of the crop order and the augmentation (position ``p`` of epoch ``e`` always draws the same).
    """

    eval_collate_fn = staticmethod(collate_detection)  # evaluation images keep their own sizes: a list

    def __init__(
        self,
        root: str | None = None,
        train_images: str | None = None,
        train_masks: str | None = None,
        val_images: str | None = None,
        val_masks: str | None = None,
        test_images: str | None = None,
        test_masks: str | None = None,
        predict_images: str | None = None,
        num_classes: int = 150,
        class_names: list[str] | None = None,
        ignore_index: int = 255,
        reduce_zero_label: bool | None = None,
        batch_size: int = 2,
        eval_batch_size: int = 1,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        crop_size: tuple[int, int] = (512, 512),
        scale: tuple[int, int] | None = (2048, 512),
        ratio_range: tuple[float, float] | None = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        hflip: float = 0.5,
        photometric: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} is a class index (num_classes {num_classes})")
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"batch sizes must be positive, got {batch_size} and {eval_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for num_classes {num_classes}")
        self.save_hyperparameters()
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_classes = num_classes
        self.datasets: dict[str, SegmentationFolder] = {}
        self._train_sampler: RepeatedAugSampler | None = None
        self.mean: Sequence[float] = (0.485, 0.456, 0.406)  # padding colour; the model's mean in setup()

    # ------------------------------------------------------------------ paths
    def _ade_root(self) -> Path:
        root = Path(self.hparams.root)
        return root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root

    def paths(self, split: str) -> tuple[str, str | None]:
        """``(image folder, mask folder)`` of ``split`` (``train``/``val``/``test``/``predict``)."""
        hp = self.hparams
        if split == "predict":
            if hp.predict_images is not None:
                return hp.predict_images, None
            return self.paths("val")[0], None
        images, masks = getattr(hp, f"{split}_images"), getattr(hp, f"{split}_masks")
        if split == "test" and images is None and masks is None:
            return self.paths("val")
        if hp.root is not None:
            root = self._ade_root()
            images = images or str(root / "images" / _ADE_SPLITS[split])
            masks = masks or str(root / "annotations" / _ADE_SPLITS[split])
        if images is None or masks is None:
            raise ValueError(f"data.{split}_images and data.{split}_masks are not set (and no data.root)")
        return images, masks

    @property
    def reduce_zero_label(self) -> bool:
        value = self.hparams.reduce_zero_label
        return self.hparams.root is not None if value is None else value

    @property
    def class_names(self) -> list[str]:
        if self.hparams.class_names is not None:
            return list(self.hparams.class_names)
        if self.hparams.root is not None and self.num_classes == len(ADE20K_CLASSES):
            return list(ADE20K_CLASSES)
        return [str(c) for c in range(self.num_classes)]

    # ------------------------------------------------------------------ datasets
    def train_transform(self) -> SegmentationTrainTransform:
        hp = self.hparams
        return SegmentationTrainTransform(
            crop_size=hp.crop_size, scale=hp.scale, ratio_range=hp.ratio_range, cat_max_ratio=hp.cat_max_ratio,
            hflip=hp.hflip, photometric=hp.photometric, fill=self.mean, ignore_index=hp.ignore_index,
        )  # fmt: skip

    def dataset(self, split: str) -> SegmentationFolder:
        images, masks = self.paths(split)
        transform = self.train_transform() if split == "train" else None
        hp = self.hparams
        return SegmentationFolder(images, masks, hp.num_classes, hp.ignore_index, self.reduce_zero_label, transform)

    def setup(self, stage: str) -> None:
        module = self.trainer.lightning_module if self.trainer is not None else None
        mean = getattr(getattr(module, "model", None), "mean", None)
        if mean is not None:
            self.mean = [float(v) for v in mean.flatten()]
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}[stage]
        for split in splits:
            if split == "val" and stage == "fit" and self.trainer is not None and self.trainer.limit_val_batches == 0:
                continue
            if split not in self.datasets:
                self.datasets[split] = self.dataset(split)

    # ------------------------------------------------------------------ loaders
    def _train_batches_per_epoch(self) -> int:
        return len(self._train_sampler) // self.batch_size

    def train_dataloader(self) -> DataLoader:
        dataset = self.datasets["train"]
        rank, world = self._rank_world()
        warnings.filterwarnings("ignore", message=_RESUME_WARNING)
        if len(dataset) < self.batch_size * world:
            raise ValueError(
                f"the training set has {len(dataset)} images, fewer than one batch of {self.batch_size} per device "
                f"on {world} device(s)"
            )
        self._train_sampler = RepeatedAugSampler(
            len(dataset), rank, world, seed=self.hparams.seed, batch_size=self.batch_size,
            resume_fn=self._batches_done, seeded=True,
        )  # fmt: skip
        generator = torch.Generator().manual_seed(self.hparams.seed + 1000 * rank)
        return LazyIterLoader(
            SeededDataset(dataset), batch_size=self.batch_size, sampler=self._train_sampler, drop_last=True,
            generator=generator, **self._loader_kwargs(),
        )  # fmt: skip
