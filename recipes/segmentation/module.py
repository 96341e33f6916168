"""``SemanticSegmenter``: a LightningModule training and evaluating UperNet / Semantic FPN on a zoo backbone.

Training as the papers' mmseg configs: AdamW with parameter groups (mmcv's rule with ``no_decay_keys``: no weight decay
on names containing a key; otherwise timm's: none on norms, biases and the backbone's ``no_weight_decay()`` tables),
an iteration schedule (poly or cosine) with
linear warm-up, cross-entropy with ``ignore_index`` on logits resized to the label size (averaged over all pixels,
ignored ones included, as mmseg's default, unless ``avg_non_ignore``), plus the auxiliary head's loss times
``aux_weight``. Evaluation accumulates one confusion matrix over the whole set, sums it across ranks, logs
``val/mIoU``, ``val/mAcc``, ``val/aAcc`` and writes the per-class table as JSON (see :mod:`.metrics`); inference is
whole-image or sliding-window at the test scale, optionally multi-scale + flip (:mod:`.inference`).
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ..param_groups import dense_param_groups, keyword_param_groups
from .build import DECODERS, build_segmenter
from .heads import resize
from .inference import MODES, segment_image
from .metrics import confusion_matrix, segmentation_metrics
from .schedule import IterationSchedule

__all__ = ["SemanticSegmenter"]


class SemanticSegmenter(pl.LightningModule):
    """Semantic segmentation with :func:`~attnzoo.recipes.segmentation.build_segmenter`.

    Args:
        decoder: ``"upernet"`` or ``"fpn"`` (Semantic FPN).
        backbone: a timm model name (zoo models are registered by ``import attnzoo``).
        num_classes: classes (ADE20K: 150; must equal the data's).
        pretrained_backbone: ``True`` (cfg weights) or a classification checkpoint / exported folder.
        backbone_kwargs: ``timm.create_model`` arguments (``drop_path_rate``, the downstream options...).
        out_indices, channels, fpn_channels, aux_head, dropout: see :func:`~.build.build_segmenter`.
        weights: a folder written by ``attnzoo convert --config <this config> --src <released mmseg checkpoint>``
            (``model.safetensors`` + ``meta.json``), loaded strictly after building.
        aux_weight: weight of the auxiliary head's loss (0.4).
        ignore_index: label left out of the loss and the metrics; ``avg_non_ignore``: average the loss over the
            labelled pixels only (mmseg's default, ``False``, averages over all pixels); ``class_weight``: per-class
            loss weights (mmseg's ``CrossEntropyLoss(class_weight=...)``; the average still counts pixels).
        lr, weight_decay, betas: AdamW; ``backbone_lr_mult``, ``layer_decay``: backbone lr multiplier and layer-wise
            decay (``None``: off).
        no_decay_keys: mmcv's ``paramwise_cfg.custom_keys`` with ``decay_mult=0`` (the official configs): no weight
            decay on parameters whose name contains a key, decay on all others (``[]``: decay everywhere). ``None``:
            timm's rule (none on 1-D parameters, biases and the backbone's ``no_weight_decay()`` names).
        max_iters: schedule length in optimizer steps (set ``trainer.max_steps`` to the same);
            ``lr_schedule``: ``"poly"`` or ``"cosine"``; ``power``: poly exponent; ``min_lr_ratio``: final lr /
            lr; ``warmup_iters``, ``warmup_ratio``: linear warm-up from ``warmup_ratio * lr``.
        test_mode: ``"whole"`` or ``"slide"``; ``test_scale``: keep-ratio resize target of evaluation images
            (``None``: their own size); ``test_size_divisor``: then resized up to a multiple of it (BiFormer's
            Semantic FPN: 32); ``slide_crop_size``, ``slide_stride``: sliding windows; ``test_ratios``,
            ``test_flip``: multi-scale / flip test (``None``: single scale).
        results_dir: folder of the per-class metric JSON files (default ``<trainer.default_root_dir>/metrics``).
        seed: seed of the per-step randomness (dropout, drop path): step ``s`` on rank ``r`` always draws the same
            numbers, so a resumed run repeats an uninterrupted one.
    """

    def __init__(
        self,
        decoder: str = "upernet",
        backbone: str = "nat_tiny",
        num_classes: int = 150,
        pretrained_backbone: bool | str = False,
        backbone_kwargs: dict[str, Any] | None = None,
        out_indices: tuple[int, ...] = (0, 1, 2, 3),
        channels: int | None = None,
        fpn_channels: int = 256,
        aux_head: bool | None = None,
        dropout: float = 0.1,
        weights: str | None = None,
        aux_weight: float = 0.4,
        ignore_index: int = 255,
        avg_non_ignore: bool = False,
        class_weight: list[float] | None = None,
        lr: float = 6e-5,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        backbone_lr_mult: float = 1.0,
        layer_decay: float | None = None,
        no_decay_keys: list[str] | None = None,
        max_iters: int = 160000,
        lr_schedule: str = "poly",
        power: float = 1.0,
        min_lr_ratio: float = 0.0,
        warmup_iters: int = 1500,
        warmup_ratio: float = 1e-6,
        test_mode: str = "whole",
        test_scale: tuple[int, int] | None = (2048, 512),
        test_size_divisor: int | None = None,
        slide_crop_size: tuple[int, int] = (512, 512),
        slide_stride: tuple[int, int] = (341, 341),
        test_ratios: list[float] | None = None,
        test_flip: bool = False,
        results_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if decoder not in DECODERS:
            raise ValueError(f"model.decoder must be one of {', '.join(DECODERS)}; got {decoder!r}")
        if test_mode not in MODES:
            raise ValueError(f"model.test_mode must be one of {', '.join(MODES)}; got {test_mode!r}")
        if aux_weight < 0 or backbone_lr_mult < 0:
            raise ValueError(
                f"model.aux_weight and model.backbone_lr_mult must be >= 0, got {aux_weight}, {backbone_lr_mult}"
            )
        if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"model.layer_decay must be in (0, 1], got {layer_decay}")
        if no_decay_keys is not None and layer_decay is not None:
            raise ValueError("model.no_decay_keys (mmcv's grouping) and model.layer_decay cannot be combined")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"model.ignore_index {ignore_index} is a class index (num_classes {num_classes})")
        if class_weight is not None and (len(class_weight) != num_classes or min(class_weight) < 0):
            raise ValueError(f"model.class_weight needs {num_classes} weights >= 0, got {class_weight}")
        self.schedule = IterationSchedule(max_iters, lr_schedule, power, min_lr_ratio, warmup_iters, warmup_ratio)
        self.model = build_segmenter(
            decoder,
            backbone,
            num_classes,
            pretrained_backbone=pretrained_backbone,
            aux_head=aux_head,
            channels=channels,
            out_indices=tuple(out_indices),
            fpn_channels=fpn_channels,
            dropout=dropout,
            **(backbone_kwargs or {}),
        )
        if weights:
            from attnzoo.weights.dense_convert import load_converted

            load_converted(self, weights)
        weight = torch.tensor(class_weight, dtype=torch.float32) if class_weight is not None else None
        self.register_buffer("class_weight", weight, persistent=False)
        self.class_names = [str(c) for c in range(num_classes)]
        self.last_metrics: dict[str, Any] | None = None  # the latest evaluation's metrics and per-class table
        self._confusion: torch.Tensor | None = None

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        data_classes = getattr(dm, "num_classes", None)
        if data_classes is not None and data_classes != self.hparams.num_classes:
            raise ValueError(
                f"the data has {data_classes} classes but model.num_classes is {self.hparams.num_classes}; "
                f"set model.num_classes: {data_classes}"
            )
        data_ignore = getattr(getattr(dm, "hparams", None), "ignore_index", None)
        if data_ignore is not None and data_ignore != self.hparams.ignore_index:
            raise ValueError(
                f"data.ignore_index ({data_ignore}) differs from model.ignore_index ({self.hparams.ignore_index})"
            )
        if getattr(dm, "class_names", None):
            self.class_names = list(dm.class_names)

    # ------------------------------------------------------------------ optimization
    def configure_optimizers(self) -> dict:
        hp = self.hparams
        backbone = self.model.backbone.body.model
        if hp.no_decay_keys is not None:
            groups = keyword_param_groups(
                self.model, backbone, hp.lr, hp.weight_decay, hp.backbone_lr_mult, hp.no_decay_keys
            )
        else:
            groups = dense_param_groups(
                self.model, backbone, hp.lr, hp.weight_decay, hp.backbone_lr_mult, hp.layer_decay
            )
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        if self.trainer.max_steps not in (-1, hp.max_iters):
            rank_zero_warn(
                f"trainer.max_steps ({self.trainer.max_steps}) differs from model.max_iters ({hp.max_iters})"
            )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ training
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        seed = hash((self.hparams.seed, self.global_step, self.global_rank)) % (2**31)
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes, H, W)`` of images ``(B, 3, H, W)`` in [0, 1] (one forward at their size)."""
        return self.model(images)

    def _ce(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """mmseg's cross-entropy: logits resized to the labels, per-pixel losses (times ``class_weight``) summed
        and divided by the number of pixels (``avg_non_ignore``: of labelled pixels)."""
        ignore = self.hparams.ignore_index
        losses = F.cross_entropy(
            resize(logits, masks.shape[-2:]), masks, weight=self.class_weight, ignore_index=ignore, reduction="none"
        )
        if self.hparams.avg_non_ignore:
            return losses.sum() / (masks != ignore).sum().clamp(min=1)
        return losses.mean()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, masks = batch[0], batch[1]
        logits, aux = self.model.forward_train(images)
        losses = {"loss_decode": self._ce(logits.float(), masks)}
        if aux is not None:
            losses["loss_aux"] = self.hparams.aux_weight * self._ce(aux.float(), masks)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {loss.item()} at step {self.global_step}: {losses}")
        size = len(images)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        for name, value in losses.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=False, batch_size=size)
        return loss

    # ------------------------------------------------------------------ evaluation
    def predict_probs(self, image: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(num_classes, H, W)`` of one image ``(3, H, W)`` in [0, 1], with the configured test
        scale, mode (whole / slide) and augmentation."""
        hp = self.hparams
        return segment_image(
            self.model, image, hp.num_classes, mode=hp.test_mode, test_scale=hp.test_scale,
            crop_size=hp.slide_crop_size, stride=hp.slide_stride, ratios=hp.test_ratios or (1.0,), flip=hp.test_flip,
            size_divisor=hp.test_size_divisor,
        )  # fmt: skip

    def _eval_batch(self, batch: Any) -> None:
        images, targets, real = batch[0], batch[1], batch[2]
        for image, target, is_real in zip(images, targets, real):
            if not bool(is_real):
                continue
            pred = self.predict_probs(image).argmax(0)
            conf = confusion_matrix(pred, target["mask"], self.hparams.num_classes, self.hparams.ignore_index)
            self._confusion = conf if self._confusion is None else self._confusion + conf

    def on_validation_epoch_start(self) -> None:
        k = self.hparams.num_classes
        self._confusion = torch.zeros(k, k, dtype=torch.int64, device=self.device)

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_batch(batch)

    test_step = validation_step

    def results_path(self, prefix: str) -> Path:
        folder = Path(self.hparams.results_dir or Path(self.trainer.default_root_dir) / "metrics")
        suffix = f"_step{self.global_step:07d}" if prefix == "val" else ""
        return folder / f"{prefix}_per_class{suffix}.json"

    def _evaluate(self, prefix: str) -> dict[str, Any] | None:
        if self.trainer.sanity_checking:
            return None
        confusion = self._confusion
        if self.trainer.world_size > 1:
            confusion = self.trainer.strategy.reduce(confusion, reduce_op="sum")
        result = segmentation_metrics(confusion, self.class_names)
        pixels = int(confusion.sum())
        for name in ("mIoU", "mAcc", "aAcc"):
            value = result[name] if not math.isnan(result[name]) else 0.0
            self.log(f"{prefix}/{name}", value, prog_bar=name == "mIoU", rank_zero_only=False, sync_dist=False)
        if self.trainer.is_global_zero:
            path = self.results_path(prefix)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps({**result, "pixels": pixels, "step": self.global_step}, indent=1))
            os.replace(tmp, path)
            rank_zero_info(
                f"{prefix}: mIoU {result['mIoU']:.4f}, mAcc {result['mAcc']:.4f}, aAcc {result['aAcc']:.4f} over "
                f"{pixels} labelled pixels; per-class table {path}"
            )
        self._confusion = None
        self.last_metrics = result
        return result

    def on_validation_epoch_end(self) -> None:
        self._evaluate("val")

    def on_test_epoch_end(self) -> None:
        self._evaluate("test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        """``{"indices": [dataset index...], "preds": [(H, W) int64 class maps]}`` of the real images of the batch."""
        images, targets, real = batch[0], batch[1], batch[2]
        indices, preds = [], []
        for image, target, is_real in zip(images, targets, real):
            if bool(is_real):
                indices.append(int(target["index"]))
                preds.append(self.predict_probs(image).argmax(0))
        return {"indices": indices, "preds": preds}
