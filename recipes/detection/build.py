"""``build_detector``: a torchvision Faster/Mask R-CNN, RetinaNet or FCOS, or a Cascade Mask R-CNN built from
torchvision's parts, on any zoo (or timm) backbone."""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from .backbones import build_backbone
from .cascade import CascadeMaskRCNN
from .mmdet_ops import OPS, MMDetAnchorGenerator, MMDetRoIAlign, MMDetTransform

__all__ = ["ARCHS", "MASK_ARCHS", "OPS", "OneBasedFCOS", "OneBasedRetinaNet", "build_detector"]

ARCHS = ("faster_rcnn", "mask_rcnn", "cascade_mask_rcnn", "retinanet", "fcos")
RCNN_ARCHS = ("faster_rcnn", "mask_rcnn", "cascade_mask_rcnn")
MASK_ARCHS = ("mask_rcnn", "cascade_mask_rcnn")


def _anchor_generator(arch: str, strides: Sequence[int], ops: str) -> AnchorGenerator:
    """Anchors per level of stride ``s``: R-CNN one size 8s (32 at stride 4) x 3 ratios; RetinaNet 4s x 2^(k/3),
    k = 0..2, x 3 ratios; FCOS one point of size s. ``ops="mmdet"``: base anchors not rounded to whole pixels."""
    cls = MMDetAnchorGenerator if ops == "mmdet" else AnchorGenerator
    if arch in RCNN_ARCHS:
        return cls(tuple((8 * s,) for s in strides), ((0.5, 1.0, 2.0),) * len(strides))
    if arch == "retinanet":
        sizes = tuple(tuple(4 * s * 2 ** (k / 3) for k in range(3)) for s in strides)
        return cls(sizes, ((0.5, 1.0, 2.0),) * len(strides))
    return cls(tuple((s,) for s in strides), ((1.0,),) * len(strides))


def _roi_pool(names: list[str], size: int, strides: Sequence[int], ops: str) -> MultiScaleRoIAlign:
    """torchvision's ``MultiScaleRoIAlign`` (2 x 2 samples per bin, ``aligned=False``) or mmdet's RoIAlign."""
    if ops == "mmdet":
        return MMDetRoIAlign(names, size, strides)
    return MultiScaleRoIAlign(names, output_size=size, sampling_ratio=2)


class _OneBasedLabels:
    """RetinaNet / FCOS with ``num_classes`` sigmoid outputs (no unused background channel) that take and return the
    one-based labels of the R-CNNs: targets are shifted down before the loss, detections up after decoding."""

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> Any:
        if targets is not None:
            targets = [{**t, "labels": t["labels"] - 1} for t in targets]
        out = super().forward(images, targets)
        if isinstance(out, list):
            out = [{**d, "labels": d["labels"] + 1} for d in out]
        return out


class OneBasedRetinaNet(_OneBasedLabels, RetinaNet):
    """:class:`~torchvision.models.detection.RetinaNet` with labels ``1..num_classes``."""


class OneBasedFCOS(_OneBasedLabels, FCOS):
    """:class:`~torchvision.models.detection.FCOS` with labels ``1..num_classes``."""


def build_detector(
    arch: str,
    backbone: str,
    num_classes: int,
    *,
    pretrained_backbone: bool | str | os.PathLike = False,
    out_indices: Sequence[int] = (0, 1, 2, 3),
    fpn_channels: int = 256,
    frozen_stages: int = -1,
    norm_eval: bool = False,
    min_size: int = 800,
    max_size: int = 1333,
    ops: str = "torchvision",
    detector_kwargs: dict[str, Any] | None = None,
    **backbone_kwargs: Any,
) -> nn.Module:
    """A ``torchvision.models.detection`` model (``arch``: ``"faster_rcnn" | "mask_rcnn" | "retinanet" | "fcos"``)
    or a :class:`~attnzoo.recipes.detection.cascade.CascadeMaskRCNN` (``"cascade_mask_rcnn"``) on the timm model
    ``backbone``.

    ``num_classes`` counts the object categories; labels are ``1..num_classes`` for every arch (0 is the R-CNNs'
    background; RetinaNet and FCOS have ``num_classes`` sigmoid outputs and shift the labels). Inference follows
    torchvision: ``model.eval()(list of (3, H, W) float images
    in [0, 1])`` -> one dict per image with ``boxes`` ``(N, 4)`` xyxy in input pixels, ``labels`` ``(N,)``,
    ``scores`` ``(N,)`` (and ``masks`` ``(N, 1, H, W)`` for the mask archs). Images are normalised with the backbone's
    mean/std and resized to ``min_size`` / ``max_size`` inside the model.

    R-CNNs use the pyramid levels of ``out_indices`` (strides 4-32) plus a max-pooled level; RetinaNet and FCOS the
    levels of stride >= 8 plus P6/P7 (as in the papers' mmdetection configs). ``pretrained_backbone``: ``True`` (the
    model's cfg weights) or a path (classification checkpoint, exported folder or weights file; classifier dropped).
    ``frozen_stages``: freeze the stem and that many stages (blocks for plain ViTs); ``norm_eval``: batch norms of the
    backbone in eval mode with frozen affine weights. ``backbone_kwargs`` go to ``timm.create_model``
    (``drop_path_rate``...); ``detector_kwargs`` to the detector class (``box_batch_size_per_image``...).

    ``ops``: ``"torchvision"`` (its RoIAlign, rounded anchors, ReLU before RetinaNet's P7, mask pasting) or
    ``"mmdet"`` (mmdetection 2.x's arithmetic, with which the papers' checkpoints were trained; see
    :mod:`~attnzoo.recipes.detection.mmdet_ops`).
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}; got {arch!r}")
    if ops not in OPS:
        raise ValueError(f"ops must be one of {', '.join(OPS)}; got {ops!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int (object categories), got {num_classes!r}")
    if min_size < 32 or max_size < min_size:
        raise ValueError(f"need 32 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}")
    rcnn = arch in RCNN_ARCHS
    body = build_backbone(
        backbone,
        extra="maxpool" if rcnn else "p6p7_on_input" if ops == "mmdet" else "p6p7",
        pretrained=pretrained_backbone,
        out_indices=out_indices,
        fpn_channels=fpn_channels,
        frozen_stages=frozen_stages,
        norm_eval=norm_eval,
        min_stride=4 if rcnn else 8,
        **backbone_kwargs,
    )
    strides = [*body.strides, *(body.strides[-1] * 2 ** (k + 1) for k in range(body.num_extra))]
    cfg = body.pretrained_cfg
    kwargs: dict[str, Any] = dict(
        min_size=min_size,
        max_size=max_size,
        image_mean=list(cfg.get("mean", (0.485, 0.456, 0.406))),
        image_std=list(cfg.get("std", (0.229, 0.224, 0.225))),
        anchor_generator=_anchor_generator(arch, strides, ops),
    )
    if arch == "fcos":
        kwargs["score_thresh"] = 0.05  # COCO evaluation threshold (torchvision's default 0.2 is for display)
    kwargs.update(detector_kwargs or {})
    if rcnn:
        names = [str(k) for k in range(len(body.strides))]
        kwargs.setdefault("box_roi_pool", _roi_pool(names, 7, body.strides, ops))
    if arch in MASK_ARCHS:
        kwargs.setdefault("mask_roi_pool", _roi_pool(names, 14, body.strides, ops))
    if arch == "mask_rcnn":
        kwargs.setdefault("mask_head", MaskRCNNHeads(fpn_channels, (fpn_channels,) * 4, 1))
        kwargs.setdefault("mask_predictor", MaskRCNNPredictor(fpn_channels, fpn_channels, num_classes + 1))
        kwargs.setdefault("box_predictor", FastRCNNPredictor(1024, num_classes + 1))  # torchvision's box head width
    cls = {
        "faster_rcnn": FasterRCNN,
        "mask_rcnn": MaskRCNN,
        "cascade_mask_rcnn": CascadeMaskRCNN,
        "retinanet": OneBasedRetinaNet,
        "fcos": OneBasedFCOS,
    }[arch]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "backbone", "num_classes", "kwargs"}
    unknown = set(detector_kwargs or {}) - accepted - {"_skip_resize"}  # torchvision drops unknown kwargs silently
    if unknown:
        raise TypeError(
            f"detector_kwargs {sorted(unknown)} not accepted by {cls.__name__}; accepted: {', '.join(sorted(accepted))}"
        )
    outputs = None if "box_predictor" in kwargs else num_classes + 1 if rcnn else num_classes
    model = cls(body, outputs, **kwargs)
    if ops == "mmdet" and arch in MASK_ARCHS:
        model.transform = MMDetTransform.like(model.transform)
    model.arch, model.backbone_name, model.ops = arch, backbone, ops
    return model
