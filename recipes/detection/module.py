"""``ObjectDetector``: a LightningModule training and evaluating a torchvision detector on a zoo backbone.

AdamW with parameter groups (no weight decay on norms, biases and the backbone's ``no_weight_decay()`` tables such as
position embeddings and relative-position biases; backbone lr multiplier; optional layer-wise lr decay through the
backbone's ``group_matcher``), linear warm-up over steps and step decay at epoch milestones ("1x": 12 epochs, steps at
8 and 11; "3x": 36, steps at 27 and 33). Evaluation runs pycocotools ``COCOeval`` (bbox, plus segm for Mask R-CNN) on
rank 0 over the detections of all ranks, logs ``val/bbox_AP``, ``val/bbox_AP50``... and writes the COCO results
JSON. Gradient clipping, precision and the strategy are Trainer settings.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ..checkpoint_io import atomic_write
from ..param_groups import dense_param_groups, keyword_param_groups
from .build import ARCHS, MASK_ARCHS, build_detector
from .evaluation import detections_to_coco, evaluate_coco
from .schedule import WarmupMultiStep, resolve_schedule

__all__ = ["ObjectDetector"]


def _category_map(categories: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``[{"id": int, "name": str}, ...]`` in label order (label ``k`` is entry ``k - 1``)."""
    return [{"id": int(c["id"]), "name": str(c.get("name", c["id"]))} for c in categories]


def _format_map(categories: list[dict[str, Any]] | None, limit: int = 12) -> str:
    """``{3: 'square', 7: 'disk'}`` (the first ``limit`` entries, then the count)."""
    if categories is None:
        return "no categories"
    items = ", ".join(f"{c['id']}: {c['name']!r}" for c in categories[:limit])
    more = f", ... ({len(categories)} in all)" if len(categories) > limit else ""
    return "{" + items + more + "}"


class ObjectDetector(pl.LightningModule):
    """Object detection / instance segmentation with :func:`~attnzoo.recipes.detection.build_detector`.

    Args:
        arch: ``"faster_rcnn" | "mask_rcnn" | "cascade_mask_rcnn" | "retinanet" | "fcos"``.
        backbone: a timm model name (zoo models are registered by ``import attnzoo``).
        num_classes: object categories (must match the data's).
        pretrained_backbone: ``True`` (cfg weights) or a classification checkpoint / exported folder / weights file.
        backbone_kwargs: ``timm.create_model`` arguments (``drop_path_rate``...).
        out_indices, fpn_channels, frozen_stages, norm_eval, min_size, max_size, ops, detector_kwargs: see
            :func:`~attnzoo.recipes.detection.build_detector` (``min_size``/``max_size``: the evaluation size; the
            data module resizes training images, the model does not resize them again; ``ops``: ``"torchvision"``
            or ``"mmdet"`` arithmetic).
        weights: a folder written by ``attnzoo convert --config`` (``model.safetensors`` + ``meta.json``), loaded
            strictly into the whole module; its categories become the module's (the data's must be the same).
        lr: AdamW learning rate of the detector (heads, pyramid); the backbone gets ``lr * backbone_lr_mult``.
        weight_decay: decoupled weight decay (not on 1-D parameters, biases and ``no_weight_decay()`` names).
        no_decay_keys: mmdetection's rule instead (``paramwise_cfg.custom_keys`` with ``decay_mult=0``): no decay on
            the parameters whose name contains one of these strings, decay on every other one (biases too).
        layer_decay: layer-wise lr decay of the backbone (``None``: off).
        betas: AdamW betas.
        schedule: ``"1x"``, ``"3x"`` or ``None`` (then ``epochs`` and ``milestones`` are required); ``epochs`` and
            ``milestones`` (epochs at which the lr is multiplied by ``gamma``) override the named schedule.
        warmup_steps, warmup_ratio: linear warm-up from ``warmup_ratio * lr`` over that many optimizer steps.
        results_dir: folder of the COCO results JSON files (default ``<trainer.default_root_dir>/detections``).
        seed: seed of the per-step randomness (RPN/RoI sampling, drop path): step ``(epoch, batch)`` on rank ``r``
            always draws the same numbers, so a resumed run repeats an uninterrupted one.
    """

    def __init__(
        self,
        arch: str = "mask_rcnn",
        backbone: str = "nat_tiny",
        num_classes: int = 80,
        pretrained_backbone: bool | str = False,
        backbone_kwargs: dict[str, Any] | None = None,
        out_indices: tuple[int, ...] = (0, 1, 2, 3),
        fpn_channels: int = 256,
        frozen_stages: int = -1,
        norm_eval: bool = False,
        min_size: int = 800,
        max_size: int = 1333,
        ops: str = "torchvision",
        detector_kwargs: dict[str, Any] | None = None,
        weights: str | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        no_decay_keys: list[str] | None = None,
        backbone_lr_mult: float = 1.0,
        layer_decay: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        schedule: str | None = "1x",
        epochs: int | None = None,
        milestones: list[int] | None = None,
        gamma: float = 0.1,
        warmup_steps: int = 500,
        warmup_ratio: float = 0.001,
        results_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if arch not in ARCHS:
            raise ValueError(f"model.arch must be one of {', '.join(ARCHS)}; got {arch!r}")
        if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"model.layer_decay must be in (0, 1], got {layer_decay}")
        if backbone_lr_mult < 0:
            raise ValueError(f"model.backbone_lr_mult must be >= 0, got {backbone_lr_mult}")
        if no_decay_keys is not None and layer_decay is not None:
            raise ValueError("model.no_decay_keys (mmdetection's grouping) and model.layer_decay cannot be combined")
        self.epochs, self.milestones = resolve_schedule(schedule, epochs, milestones)
        self.model = build_detector(
            arch,
            backbone,
            num_classes,
            pretrained_backbone=False if weights else pretrained_backbone,  # the converted weights replace them
            out_indices=tuple(out_indices),
            fpn_channels=fpn_channels,
            frozen_stages=frozen_stages,
            norm_eval=norm_eval,
            min_size=min_size,
            max_size=max_size,
            ops=ops,
            detector_kwargs={"_skip_resize": True, **(detector_kwargs or {})},
            **(backbone_kwargs or {}),
        )
        self.iou_types = ("bbox", "segm") if arch in MASK_ARCHS else ("bbox",)
        self.categories: list[dict[str, Any]] = [{"id": k, "name": str(k)} for k in range(1, num_classes + 1)]
        self._data_categories: list[dict[str, Any]] | None = None  # the annotation files', set by setup()
        self._map_from_checkpoint = False
        self._weights_categories: list[dict[str, Any]] | None = None  # the converted weights' map, if they store one
        if weights:
            from attnzoo.weights.dense_convert import load_converted

            converted = load_converted(self, weights)
            if converted:
                self.categories = self._weights_categories = _category_map(converted)
        self._results: list[dict[str, Any]] = []
        self._image_ids: list[int] = []

    @property
    def category_ids(self) -> list[int]:
        return [c["id"] for c in self.categories]

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        """Take the category map (COCO ids and names, in label order) of the annotation files. A checkpoint loaded
        with ``--ckpt_path`` must have the same map (:meth:`on_load_checkpoint`); without one, the number of
        categories must be ``model.num_classes`` (checked when the stage starts, once it is known that no checkpoint
        was loaded)."""
        dm = self.trainer.datamodule
        self._data_categories = _category_map(dm.categories) if getattr(dm, "categories", None) else None
        data, converted = self._data_categories, self._weights_categories
        if data is not None and converted is not None and data != converted:
            raise ValueError(
                f"model.weights {self.hparams.weights} predicts the categories {_format_map(converted)}, but the "
                f"annotation files have {_format_map(data)}; evaluate on annotations that list the same categories "
                "(same COCO ids and names)"
            )
        if data is not None:
            self.categories = data
        self._map_from_checkpoint = False

    def _check_num_classes(self) -> None:
        data = self._data_categories
        if data is None or self._map_from_checkpoint or len(data) == self.hparams.num_classes:
            return
        raise ValueError(
            f"the annotations have {len(data)} categories ({_format_map(data)}) but model.num_classes is "
            f"{self.hparams.num_classes}; set model.num_classes: {len(data)}"
        )

    def on_fit_start(self) -> None:
        self._check_num_classes()

    on_validation_start = on_test_start = on_predict_start = on_fit_start

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["categories"] = self.categories

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the checkpoint's category map, before its weights. ValueError naming both maps when the
        annotation files of this run have another one (other ids, names, order or number: the labels would mean
        other categories), and naming the checkpoint's class count when ``model.num_classes`` differs from it."""
        saved = checkpoint.get("categories")
        data = self._data_categories
        if saved is None:  # a checkpoint from elsewhere: only the class count can be compared
            if data is not None and len(data) != self.hparams.num_classes:
                raise ValueError(
                    f"the annotations have {len(data)} categories ({_format_map(data)}) but model.num_classes is "
                    f"{self.hparams.num_classes}, and the checkpoint stores no category map to compare them with"
                )
            return
        saved = _category_map(saved)
        if data is not None and saved != data:
            raise ValueError(
                f"the annotation files' categories differ from the checkpoint's: the checkpoint was trained with "
                f"{_format_map(saved)}, the data has {_format_map(data)}. A detector's labels only mean the "
                "categories it was trained with: evaluate or resume with annotations that list the same categories "
                "(same COCO ids and names), or train a new model on these ones (without --ckpt_path)"
            )
        if len(saved) != self.hparams.num_classes:
            raise ValueError(
                f"the checkpoint was trained with {len(saved)} categories ({_format_map(saved)}) but model.num_classes "
                f"is {self.hparams.num_classes}; set model.num_classes: {len(saved)} to load it"
            )
        self.categories = saved
        self._map_from_checkpoint = True

    # ------------------------------------------------------------------ optimization
    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """AdamW groups (:mod:`attnzoo.recipes.param_groups`): with ``no_decay_keys``, mmdetection's rule
        (:func:`~attnzoo.recipes.param_groups.keyword_param_groups`); otherwise the backbone's timm weight-decay /
        layer-decay grouping (lr ``lr * backbone_lr_mult * lr_scale``) and the rest (decay on >= 2-D weights only,
        :func:`~attnzoo.recipes.param_groups.dense_param_groups`)."""
        hp = self.hparams
        backbone = self.model.backbone.body.model
        if hp.no_decay_keys is not None:
            return keyword_param_groups(
                self.model, backbone, lr, hp.weight_decay, hp.backbone_lr_mult, hp.no_decay_keys
            )
        return dense_param_groups(self.model, backbone, lr, hp.weight_decay, hp.backbone_lr_mult, hp.layer_decay)

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.param_groups(hp.lr), lr=hp.lr, betas=tuple(hp.betas))
        if self.trainer.max_epochs not in (None, -1, self.epochs):
            rank_zero_warn(
                f"trainer.max_epochs ({self.trainer.max_epochs}) differs from the schedule's {self.epochs} epochs "
                f"(lr steps at epochs {list(self.milestones)})"
            )
        self.trainer.estimated_stepping_batches  # noqa: B018  (loads the training batches, sets num_training_batches)
        batches = int(self.trainer.num_training_batches)
        steps_per_epoch = max(1, -(-batches // self.trainer.accumulate_grad_batches))
        schedule = WarmupMultiStep(steps_per_epoch, self.milestones, hp.gamma, hp.warmup_steps, hp.warmup_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ training
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        seed = hash((self.hparams.seed, self.current_epoch, batch_idx, self.global_rank)) % (2**31)
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Detections (torchvision format, boxes in input pixels) of images ``[(3, H, W), ...]`` in [0, 1]."""
        return self.model(list(images))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, targets = batch[0], batch[1]
        losses = self.model(list(images), list(targets))
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {loss.item()} at step {self.global_step}: {losses}")
        size = len(images)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        for name, value in losses.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=False, batch_size=size)
        return loss

    # ------------------------------------------------------------------ evaluation
    def _collect(self, batch: Any) -> tuple[list[int], list[dict[str, Any]]]:
        images, targets = batch[0], batch[1]
        real = batch[2] if len(batch) > 2 else [True] * len(images)
        outputs = self.model(list(images))
        ids, results = [], []
        for output, target, is_real in zip(outputs, targets, real):
            if bool(is_real):
                ids.append(int(target["image_id"]))
                results.extend(detections_to_coco(output, target["image_id"], self.category_ids))
        return ids, results

    def on_validation_epoch_start(self) -> None:
        self._results, self._image_ids = [], []

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        ids, results = self._collect(batch)
        self._image_ids.extend(ids)
        self._results.extend(results)

    test_step = validation_step

    def _gather(self) -> tuple[list[int], list[dict[str, Any]]] | None:
        """All ranks' image ids and results on rank 0 (``None`` on the other ranks)."""
        local = (self._image_ids, self._results)
        if self.trainer.world_size == 1 or not dist.is_initialized():
            return local
        gathered: list | None = [None] * self.trainer.world_size if self.global_rank == 0 else None
        dist.gather_object(local, gathered, dst=0)
        if gathered is None:
            return None
        return [i for ids, _ in gathered for i in ids], [r for _, res in gathered for r in res]

    def results_path(self, prefix: str) -> Path:
        """``val_detections_epoch<E>.json`` (validation during ``fit``), ``validate_detections_epoch<E>.json``
        (``validate``, so it never replaces ``fit``'s file of that epoch) or ``test_detections.json``."""
        folder = Path(self.hparams.results_dir or Path(self.trainer.default_root_dir) / "detections")
        if prefix == "val" and self.trainer.state.fn == "validate":
            prefix = "validate"
        suffix = f"_epoch{self.current_epoch:03d}" if prefix in ("val", "validate") else ""
        return folder / f"{prefix}_detections{suffix}.json"

    def _evaluate(self, prefix: str) -> None:
        if self.trainer.sanity_checking:
            return
        split = "val" if prefix == "val" else "test"
        gathered = self._gather()
        metrics: dict[str, float] | None = None
        if gathered is not None:
            image_ids, results = gathered
            path = atomic_write(self.results_path(prefix), json.dumps(results))
            coco_gt = getattr(self.trainer.datamodule, "coco_gt", {}).get(split)
            if coco_gt is None:
                raise ValueError(f"the datamodule has no COCO ground truth for the {split} split (coco_gt[{split!r}])")
            metrics, text = evaluate_coco(coco_gt, results, self.iou_types, image_ids=image_ids)
            rank_zero_info(f"COCO {prefix} on {len(set(image_ids))} images ({path}):\n{text}")
        metrics = self.trainer.strategy.broadcast(metrics, src=0)
        for name, value in metrics.items():
            self.log(f"{prefix}/{name}", value, prog_bar=name in ("bbox_AP", "segm_AP"), rank_zero_only=False)
        self._results, self._image_ids = [], []

    def on_validation_epoch_end(self) -> None:
        self._evaluate("val")

    def on_test_epoch_end(self) -> None:
        self._evaluate("test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        """``{"image_ids": [...], "results": [COCO result dicts]}`` for the real images of the batch."""
        ids, results = self._collect(batch)
        return {"image_ids": ids, "results": results}
