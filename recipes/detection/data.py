"""``CocoDataModule``: COCO-format detection data for torchvision detectors, DDP-correct and resumable.

Images and targets come from torchvision's ``CocoDetection`` wrapped by ``wrap_dataset_for_transforms_v2`` (boxes
as ``tv_tensors.BoundingBoxes``, masks as ``tv_tensors.Mask``), so ``transforms.v2`` move them with the image:
training resizes the short side to a random scale of ``train_scales`` (long side capped at ``train_max_size``) and
flips; the model does not resize training images again (``_skip_resize``). Evaluation images stay at their file
size (the detector resizes them and maps its boxes back). Annotation files are checked first (:mod:`.coco_json`).

A batch is ``(images, targets)`` (training) or ``(images, targets, is_real)`` (evaluation): tuples of
``(3, H, W)`` float images in [0, 1] and dicts with ``boxes`` ``(N, 4)`` xyxy, ``labels`` ``(N,)`` in
``1..num_classes`` (contiguous; :attr:`CocoDataModule.category_ids` maps label ``k`` back to COCO id
``category_ids[k - 1]``), ``masks`` ``(N, H, W)`` uint8 when masks are used, ``image_id``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
from torchvision.datasets.vision import VisionDataset
from torchvision.transforms import v2

from ..loaders import LazyIterLoader, RankAwareDataModule
from ..samplers import AspectRatioBatchSampler, check_aspect_ratio_bins
from .augment import AUGMENTATIONS, DETR_CROP_SCALES, DETR_CROP_SIZE, train_transform
from .build import MASK_ARCHS
from .coco_json import images_folder_as_coco, load_coco_json

__all__ = ["CocoDataModule", "CocoJsonDataset", "DetectionDataset", "collate_detection"]

_RESUME_WARNING = "You're resuming from a checkpoint that ended before the epoch ended"
DEFAULT_SCALES = tuple(range(480, 801, 32))


def coco_from_dict(data: dict[str, Any]) -> COCO:
    """A pycocotools ``COCO`` index over an in-memory dict (pycocotools' index messages are silenced)."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoJsonDataset(CocoDetection):
    """torchvision's ``CocoDetection`` over a checked, in-memory COCO dict (``wrap_dataset_for_transforms_v2``
    treats it as a ``CocoDetection``)."""

    def __init__(self, images_dir: str | os.PathLike, data: dict[str, Any]) -> None:
        VisionDataset.__init__(self, images_dir)
        self.coco = coco_from_dict(data)
        self.ids = sorted(self.coco.imgs)


class DetectionDataset(Dataset):
    """Items ``(image (3, H, W) float in [0, 1], target)`` of a :class:`CocoJsonDataset` with contiguous labels,
    crowd annotations dropped (``drop_crowd``) and ``transform`` (a ``transforms.v2`` callable) applied.

    Indices may be ``(epoch, index)`` pairs (training): the item's random transform is then seeded from
    ``(seed, epoch, index)``, so a resumed run draws the same augmentation as an uninterrupted one.
    """

    def __init__(
        self,
        base: CocoJsonDataset,
        category_ids: Sequence[int],
        transform: Any,
        with_masks: bool,
        drop_crowd: bool,
        seed: int = 0,
    ) -> None:
        keys = {"image_id", "boxes", "labels", "iscrowd"} | ({"masks"} if with_masks else set())
        self.base, self.wrapped = base, wrap_dataset_for_transforms_v2(base, target_keys=keys)
        self.label_of = {c: k + 1 for k, c in enumerate(category_ids)}
        self.transform, self.with_masks, self.drop_crowd, self.seed = transform, with_masks, drop_crowd, seed

    def __len__(self) -> int:
        return len(self.base)

    def image_sizes(self) -> torch.Tensor:
        """``(width, height)`` of every item, ``(N, 2)``, from the annotation file."""
        imgs = self.base.coco.imgs
        return torch.tensor([[imgs[i]["width"], imgs[i]["height"]] for i in self.base.ids], dtype=torch.int64)

    def _target(self, image: Any, raw: dict[str, Any]) -> dict[str, Any]:
        height, width = image.height, image.width
        if "boxes" not in raw:  # an image without annotations
            raw = {
                "image_id": raw["image_id"],
                "boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(height, width)),
                "labels": torch.zeros(0, dtype=torch.int64),
                "iscrowd": [],
            }
            if self.with_masks:
                raw["masks"] = tv_tensors.Mask(torch.zeros(0, height, width, dtype=torch.uint8))
        labels = torch.tensor([self.label_of[int(c)] for c in raw["labels"]], dtype=torch.int64)
        keep = torch.ones(len(labels), dtype=torch.bool)
        if self.drop_crowd:
            keep = torch.tensor([not c for c in raw["iscrowd"]], dtype=torch.bool).reshape(-1)
        boxes = tv_tensors.wrap(raw["boxes"][keep], like=raw["boxes"])  # indexing unwraps tv_tensors
        target = {"image_id": int(raw["image_id"]), "boxes": boxes, "labels": labels[keep]}
        if self.with_masks:
            target["masks"] = tv_tensors.Mask(raw["masks"][keep])
        return target

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, dict[str, Any]]:
        if isinstance(index, tuple):
            epoch, index = index
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(hash((self.seed, epoch, index)) % (2**31))
                return self._item(index)
        return self._item(index)

    def _item(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        try:
            image, raw = self.wrapped[index]
        except Exception as err:  # PIL: truncated / unidentified / corrupt files; pycocotools: annotations
            image_id = self.base.ids[index]
            path = os.path.join(self.base.root, self.base.coco.imgs[image_id]["file_name"])
            try:
                self.base._load_image(image_id)
            except (OSError, SyntaxError, ValueError) as image_err:
                raise ValueError(f"cannot read image {path} (image id {image_id}): {image_err}") from err
            raise ValueError(
                f"cannot turn the annotations of image id {image_id} ({path}; annotation ids "
                f"{self.base.coco.getAnnIds(imgIds=image_id)[:10]}) into targets: {type(err).__name__}: {err}"
            ) from err
        image, target = self.transform(image, self._target(image, raw))
        out = {"image_id": target["image_id"], "boxes": target["boxes"].as_subclass(torch.Tensor).float()}
        out["labels"] = target["labels"]
        if self.with_masks:
            out["masks"] = target["masks"].as_subclass(torch.Tensor).to(torch.uint8)
        return image.as_subclass(torch.Tensor), out


def collate_detection(batch: list[tuple]) -> tuple:
    """``[(image, target, ...), ...]`` -> ``((images...), (targets...), ...)`` (detectors take lists)."""
    columns = tuple(zip(*batch))
    if len(columns) > 2:  # evaluation: the real/padding flags as one bool tensor
        columns = (*columns[:2], torch.tensor(columns[2], dtype=torch.bool))
    return columns


class _EpochTaggedBatches:
    """Wraps a batch sampler so that every index becomes ``(epoch, index)`` (see :class:`DetectionDataset`)."""

    def __init__(self, batch_sampler: AspectRatioBatchSampler) -> None:
        self.inner = batch_sampler

    @property
    def sampler(self) -> _EpochTaggedBatches:
        """Itself: Lightning calls ``set_epoch`` on ``dataloader.batch_sampler.sampler``."""
        return self

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.inner:
            yield [(self.inner.epoch, i) for i in batch]


class CocoDataModule(RankAwareDataModule):
    """Train / val / test / predict loaders over COCO-format annotation files.

    Args:
        root: COCO 2017 folder; the defaults are ``<root>/annotations/instances_{train,val}2017.json`` and
            ``<root>/{train,val}2017``. Any path below overrides its default.
        train_ann, train_images, val_ann, val_images: a COCO-format JSON and its image folder per split.
        test_ann, test_images: the test split (default: the validation split).
        predict_ann, predict_images: images to predict (default: the validation split); ``predict_images`` alone
            predicts every image file of that folder.
        batch_size: images per device and step. ``eval_batch_size``: images per device in evaluation (default 1, as
            the papers' evaluations: a batch pads its images to a common size, which changes the detections
            slightly, so a result then depends on which images share a batch).
        num_workers, pin_memory, persistent_workers: DataLoader settings.
        train_scales: short-side sizes drawn per training image (default 480, 512, ..., 800); ``train_max_size``
            caps the long side (1333). The evaluation size is the model's (``min_size`` / ``max_size``).
        hflip: horizontal flip probability.
        augment: ``"resize"`` (short side from ``train_scales``, flip) or ``"detr_crop"`` (DETR's multi-scale crop
            augmentation of the NAT/DiNAT 3x and Agent-Swin configs: flip, then either a ``train_scales`` resize or
            a ``crop_scales`` resize, a random crop of ``crop_size`` = ``[min, max]`` pixels per side and a
            ``train_scales`` resize; :mod:`~attnzoo.recipes.detection.augment`).
        aspect_ratio_bins: width/height ratios that group the training batches (each batch has images of one bin;
            default portrait / landscape; ratios in ``[1/8, 8]``); ``None``: one bin.
        with_masks: load instance masks; ``None``: when the attached model is a (Cascade) Mask R-CNN.
        skip_empty_train: leave training images without (non-crowd) annotations out.
        seed: seed of the batch order and the augmentation (epoch ``e`` uses ``seed + e``).
    """

    collate_fn = staticmethod(collate_detection)

    def __init__(
        self,
        root: str | None = None,
        train_ann: str | None = None,
        train_images: str | None = None,
        val_ann: str | None = None,
        val_images: str | None = None,
        test_ann: str | None = None,
        test_images: str | None = None,
        predict_ann: str | None = None,
        predict_images: str | None = None,
        batch_size: int = 2,
        eval_batch_size: int = 1,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        train_scales: Sequence[int] = DEFAULT_SCALES,
        train_max_size: int = 1333,
        hflip: float = 0.5,
        augment: str = "resize",
        crop_scales: Sequence[int] = DETR_CROP_SCALES,
        crop_size: Sequence[int] = DETR_CROP_SIZE,
        aspect_ratio_bins: Sequence[float] | None = (0.75, 1.333),
        with_masks: bool | None = None,
        skip_empty_train: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not train_scales or any(int(s) < 1 for s in train_scales):
            raise ValueError(f"train_scales must be a non-empty list of positive sizes, got {list(train_scales)}")
        if train_max_size < max(train_scales):
            raise ValueError(
                f"train_max_size ({train_max_size}) must be >= the largest train scale ({max(train_scales)})"
            )
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip must be a probability in [0, 1], got {hflip}")
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}; got {augment!r}")
        if augment == "detr_crop":
            if not crop_scales or any(int(s) < 1 for s in crop_scales) or max(crop_scales) > train_max_size:
                raise ValueError(f"crop_scales must be positive sizes <= train_max_size, got {list(crop_scales)}")
            if len(crop_size) != 2 or not 1 <= crop_size[0] <= crop_size[1]:
                raise ValueError(f"crop_size must be [min, max] with 1 <= min <= max, got {list(crop_size)}")
        if aspect_ratio_bins is not None:
            check_aspect_ratio_bins(aspect_ratio_bins)
        self.save_hyperparameters()
        self.batch_size = batch_size
        if eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be positive, got {eval_batch_size}")
        self.eval_batch_size = eval_batch_size
        self.datasets: dict[str, DetectionDataset] = {}
        self.category_ids: list[int] | None = None
        self.categories: list[dict] | None = None
        self.coco_gt: dict[str, COCO] = {}
        self._train_sampler: AspectRatioBatchSampler | None = None

    # ------------------------------------------------------------------ paths
    def paths(self, split: str) -> tuple[str | None, str | None]:
        """``(annotation file, image folder)`` of ``split`` (``train``/``val``/``test``/``predict``)."""
        hp = self.hparams
        ann, images = getattr(hp, f"{split}_ann"), getattr(hp, f"{split}_images")
        if split in ("test", "predict") and ann is None and images is None:
            return self.paths("val")
        if split in ("train", "val") and hp.root is not None:
            ann = ann or str(Path(hp.root) / "annotations" / f"instances_{split}2017.json")
            images = images or str(Path(hp.root) / f"{split}2017")
        if images is None:
            raise ValueError(f"data.{split}_images is not set (and no data.root with the COCO 2017 layout)")
        if ann is None and split != "predict":
            raise ValueError(f"data.{split}_ann is not set (and no data.root with the COCO 2017 layout)")
        return ann, images

    # ------------------------------------------------------------------ datasets
    def _with_masks(self) -> bool:
        if self.hparams.with_masks is not None:
            return self.hparams.with_masks
        module = self.trainer.lightning_module if self.trainer is not None else None
        return getattr(getattr(module, "hparams", None), "arch", None) in MASK_ARCHS

    def _set_categories(self, data: dict[str, Any], ann: str) -> None:
        categories = sorted(data["categories"], key=lambda c: c["id"])
        ids = [c["id"] for c in categories]
        if not ids:
            return
        if self.category_ids is not None and ids != self.category_ids:
            raise ValueError(
                f"{ann}: categories {ids[:10]} differ from the training categories {self.category_ids[:10]}"
            )
        self.category_ids, self.categories = ids, categories

    def train_transform(self) -> v2.Compose:
        hp = self.hparams
        return train_transform(
            hp.augment, hp.train_scales, hp.train_max_size, hp.hflip, crop_scales=hp.crop_scales, crop_size=hp.crop_size
        )

    @staticmethod
    def eval_transform() -> v2.Compose:
        return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])

    def _dataset(self, split: str, masks: bool) -> DetectionDataset:
        ann, images = self.paths(split)
        if ann is None:
            data = images_folder_as_coco(images)
        else:
            require = split != "predict"
            data = load_coco_json(ann, images, require_annotations=require, require_masks=masks and require)
            self._set_categories(data, ann)
        if split == "train" and self.hparams.skip_empty_train:
            used = {a["image_id"] for a in data["annotations"] if not a["iscrowd"]}
            if not used:
                raise ValueError(
                    f"{ann}: no training image has an annotation with iscrowd 0 ({len(data['annotations'])} "
                    "annotations, all crowd, which training ignores); a training set needs annotations with "
                    "iscrowd 0 (data.skip_empty_train: true leaves images without them out)"
                )
            data = {**data, "images": [im for im in data["images"] if im["id"] in used]}
        base = CocoJsonDataset(images, data)
        if split != "train" and ann is not None:
            self.coco_gt[split] = coco_from_dict(copy.deepcopy(data))  # COCOeval rewrites segmentations in place
        transform = self.train_transform() if split == "train" else self.eval_transform()
        categories = self.category_ids or []
        return DetectionDataset(base, categories, transform, masks, drop_crowd=split == "train", seed=self.hparams.seed)

    def setup(self, stage: str) -> None:
        masks = self._with_masks()
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}[stage]
        for split in splits:
            self.datasets[split] = self._dataset(split, masks)

    @property
    def num_classes(self) -> int | None:
        """Number of categories (``None`` before ``setup`` or for an unannotated predict folder)."""
        return len(self.category_ids) if self.category_ids else None

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        dataset = self.datasets["train"]
        rank, world = self._rank_world()
        warnings.filterwarnings("ignore", message=_RESUME_WARNING)
        sizes = dataset.image_sizes().double()
        bins = self.hparams.aspect_ratio_bins or (1.0,)
        ratios = (sizes[:, 0] / sizes[:, 1]) if self.hparams.aspect_ratio_bins else torch.ones(len(sizes))
        self._train_sampler = AspectRatioBatchSampler(
            ratios, bins, self.batch_size, rank, world, seed=self.hparams.seed, resume_fn=self._batches_done
        )
        generator = torch.Generator().manual_seed(self.hparams.seed + 1000 * rank)
        batches = _EpochTaggedBatches(self._train_sampler)
        return LazyIterLoader(dataset, batch_sampler=batches, generator=generator, **self._loader_kwargs())
