"""mmdetection 2.x checkpoints (Mask R-CNN, Cascade Mask R-CNN, RetinaNet) -> an ``ObjectDetector``'s state dict.

The released COCO models of NAT, DiNAT, BiFormer and Agent Attention are mmdet ``{meta, state_dict}`` files with
the prefixes ``backbone.``, ``neck.`` (FPN), ``rpn_head.``, ``roi_head.{bbox_head,mask_head}.`` (Cascade:
``roi_head.bbox_head.{0,1,2}.``, ``roi_head.mask_head.{0,1,2}.``) and ``bbox_head.`` (RetinaNet). Layout differences
from torchvision's detectors, all handled here:

- mmcv ``ConvModule``: ``<name>.conv.*`` / ``<name>.bn.*`` are torchvision's ``Conv2dNormActivation`` ``<name>.0.*`` /
  ``<name>.1.*``; FPN ``lateral_convs`` / ``fpn_convs`` are ``inner_blocks`` / ``layer_blocks`` (RetinaNet's last two
  ``fpn_convs`` are ``extra_blocks.p6`` / ``p7``); ``rpn_conv`` / ``rpn_cls`` / ``rpn_reg`` are ``conv.0.0`` /
  ``cls_logits`` / ``bbox_pred``.
- The R-CNN classifier ``fc_cls`` has the background LAST (``K + 1`` rows), torchvision's ``cls_score`` FIRST.
- The class-specific box regression ``fc_reg`` has ``4 K`` rows (no background), torchvision's ``bbox_pred``
  ``4 (K + 1)``: zero rows are put first (the background's deltas are never used). A class-agnostic ``fc_reg``
  (4 rows) is copied to every class, which decodes the same boxes.
- The mask logits ``conv_logits`` have ``K`` channels, torchvision's ``mask_fcn_logits`` ``K + 1`` (a zero channel
  first). RetinaNet's sigmoid classifier ``retina_cls`` has the same layout as ours (anchor-major, ``K`` classes).
- Backbone keys (``backbone.`` removed) go through :func:`attnzoo.weights.downstream.convert_backbone_state`, which
  maps the official downstream layouts of NAT/DiNAT, BiFormer, Agent-Swin and Agent-PVT (output norms included)
  onto the zoo's downstream backbones, strictly; attnzoo keys pass unchanged. Other backbones take attnzoo keys.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["coco_categories", "map_state_dict"]


def coco_categories() -> list[dict[str, Any]]:
    """COCO 2017's 80 object categories in id order (``[{"id": 1, "name": "person"}, ...]``; mmdet's class ``k``
    is the ``k``-th), from torchvision's published COCO category list."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    names = FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]  # index = COCO id, gaps as "N/A"
    return [{"id": i, "name": n} for i, n in enumerate(names) if n not in ("__background__", "N/A")]


def _background_first(value: Tensor) -> Tensor:
    """``fc_cls`` rows ``[class 0..K-1, background]`` -> ``[background, class 0..K-1]``."""
    return torch.cat([value[-1:], value[:-1]])


def _zero_background(rows: int) -> Callable[[Tensor], Tensor]:
    """Prepend ``rows`` zero rows (the background's box deltas or mask channel)."""
    return lambda value: torch.cat([value.new_zeros((rows, *value.shape[1:])), value])


def _backbone_state(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The checkpoint's backbone tensors (``backbone.`` removed) -> the detector's keys (``backbone.body.…``)."""
    from .downstream import DOWNSTREAM_FAMILIES, convert_backbone_state, family_module

    body = model.backbone.body
    if family_module(model.backbone_name).__name__ in DOWNSTREAM_FAMILIES:
        converted = convert_backbone_state(model.backbone_name, state, body)  # strict; "model." prefixed
    else:
        converted = {("model." if hasattr(body, "model") else "") + k: v for k, v in state.items()}
    return {f"backbone.body.{k}": v for k, v in converted.items()}


class _Mapper:
    """Rules ``mmdet key regex -> (our key template, value transform)`` for one detector."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.rules: list[tuple[re.Pattern[str], Callable[[re.Match[str], Tensor], tuple[str, Tensor] | None]]] = []

    def rule(
        self,
        pattern: str,
        target: str | Callable[[re.Match[str]], str | None],
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        """Keys matching ``pattern`` go to ``target`` (a ``re`` template, or a function of the match that may return
        ``None``: no place), their values through ``transform``."""

        def apply(match: re.Match[str], value: Tensor) -> tuple[str, Tensor] | None:
            key = target(match) if callable(target) else match.expand(target)
            if key is None:
                return None
            return key, transform(value) if transform is not None else value

        self.rules.append((re.compile(pattern + "$"), apply))

    def map(self, key: str, value: Tensor) -> tuple[str, Tensor] | None:
        """``(our key, value)`` of an mmdet key, or ``None`` when no rule places it."""
        for pattern, apply in self.rules:
            match = pattern.match(key)
            if match:
                return apply(match, value)
        return None


def _rules(model: nn.Module, num_classes: int) -> _Mapper:
    """The key rules of ``model`` (a built detector with ``arch``)."""
    mapper = _Mapper(model)
    w = r"(?P<p>weight|bias)"
    bn = r"(?P<p>weight|bias|running_mean|running_var|num_batches_tracked)"
    inner = len(model.backbone.fpn.inner_blocks) if hasattr(model.backbone, "fpn") else 0

    def fpn_conv(match: re.Match[str]) -> str | None:
        i, p = int(match.group("i")), match.group("p")
        if i < inner:
            return f"backbone.fpn.layer_blocks.{i}.0.{p}"
        return f"backbone.fpn.extra_blocks.{('p6', 'p7')[i - inner]}.{p}" if i - inner < 2 else None

    mapper.rule(r"neck\.lateral_convs\.(?P<i>\d+)\.conv\." + w, r"backbone.fpn.inner_blocks.\g<i>.0.\g<p>")
    mapper.rule(r"neck\.fpn_convs\.(?P<i>\d+)\.conv\." + w, fpn_conv)
    if model.arch == "retinanet":
        mapper.rule(r"bbox_head\.cls_convs\.(?P<i>\d+)\.conv\." + w, r"head.classification_head.conv.\g<i>.0.\g<p>")
        mapper.rule(r"bbox_head\.reg_convs\.(?P<i>\d+)\.conv\." + w, r"head.regression_head.conv.\g<i>.0.\g<p>")
        mapper.rule(r"bbox_head\.retina_cls\." + w, r"head.classification_head.cls_logits.\g<p>")
        mapper.rule(r"bbox_head\.retina_reg\." + w, r"head.regression_head.bbox_reg.\g<p>")
        return mapper
    mapper.rule(r"rpn_head\.rpn_conv\." + w, r"rpn.head.conv.0.0.\g<p>")
    mapper.rule(r"rpn_head\.rpn_cls\." + w, r"rpn.head.cls_logits.\g<p>")
    mapper.rule(r"rpn_head\.rpn_reg\." + w, r"rpn.head.bbox_pred.\g<p>")

    def box_regression(value: Tensor) -> Tensor:
        if value.shape[0] == 4:  # class-agnostic: the same deltas for every class
            return value.repeat(num_classes + 1, *([1] * (value.ndim - 1)))
        if value.shape[0] != 4 * num_classes:
            raise ValueError(f"fc_reg has {value.shape[0]} outputs; {num_classes} classes need {4 * num_classes} or 4")
        return _zero_background(4)(value)

    def classifier(value: Tensor) -> Tensor:
        if value.shape[0] != num_classes + 1:
            raise ValueError(
                f"fc_cls has {value.shape[0]} outputs (classes + background) but the config has num_classes "
                f"{num_classes}; set model.num_classes: {value.shape[0] - 1}"
            )
        return _background_first(value)

    if model.arch == "cascade_mask_rcnn":
        stage = r"roi_head\.bbox_head\.(?P<s>\d+)\."
        heads = r"roi_heads.box_heads.\g<s>."
        mapper.rule(stage + r"shared_convs\.(?P<i>\d+)\.conv\.weight", heads + r"\g<i>.0.weight")
        mapper.rule(stage + r"shared_convs\.(?P<i>\d+)\.bn\." + bn, heads + r"\g<i>.1.\g<p>")
        fc_index = next(i for i, m in enumerate(model.roi_heads.box_heads[0]) if isinstance(m, nn.Linear))
        mapper.rule(stage + r"shared_fcs\.0\." + w, heads + f"{fc_index}." + r"\g<p>")
        mapper.rule(stage + r"fc_cls\." + w, r"roi_heads.box_predictors.\g<s>.cls_score.\g<p>", classifier)
        mapper.rule(stage + r"fc_reg\." + w, r"roi_heads.box_predictors.\g<s>.bbox_pred.\g<p>", box_regression)
        mask = r"roi_head\.mask_head\.(?P<s>\d+)\."
        mapper.rule(mask + r"convs\.(?P<i>\d+)\.conv\." + w, r"roi_heads.mask_heads.\g<s>.\g<i>.0.\g<p>")
        mapper.rule(mask + r"upsample\." + w, r"roi_heads.mask_predictors.\g<s>.conv5_mask.\g<p>")
        mapper.rule(
            mask + r"conv_logits\." + w, r"roi_heads.mask_predictors.\g<s>.mask_fcn_logits.\g<p>", _zero_background(1)
        )
        return mapper
    mapper.rule(r"roi_head\.bbox_head\.shared_fcs\.0\." + w, r"roi_heads.box_head.fc6.\g<p>")
    mapper.rule(r"roi_head\.bbox_head\.shared_fcs\.1\." + w, r"roi_heads.box_head.fc7.\g<p>")
    mapper.rule(r"roi_head\.bbox_head\.fc_cls\." + w, r"roi_heads.box_predictor.cls_score.\g<p>", classifier)
    mapper.rule(r"roi_head\.bbox_head\.fc_reg\." + w, r"roi_heads.box_predictor.bbox_pred.\g<p>", box_regression)
    if model.arch == "mask_rcnn":
        mapper.rule(r"roi_head\.mask_head\.convs\.(?P<i>\d+)\.conv\." + w, r"roi_heads.mask_head.\g<i>.0.\g<p>")
        mapper.rule(r"roi_head\.mask_head\.upsample\." + w, r"roi_heads.mask_predictor.conv5_mask.\g<p>")
        mapper.rule(
            r"roi_head\.mask_head\.conv_logits\." + w, r"roi_heads.mask_predictor.mask_fcn_logits.\g<p>",
            _zero_background(1),
        )  # fmt: skip
    return mapper


def map_state_dict(module: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """An mmdet detector state dict -> the state dict of ``module`` (an ``ObjectDetector``; keys ``model.…``).

    Raises ``ValueError`` naming the source keys that have no place in the module (or whose arch does not match
    ``module.hparams.arch``). When the module has COCO's 80 classes its categories become COCO's (mmdet's class
    ``k`` is COCO's ``k``-th category).
    """
    model = module.model
    num_classes = int(module.hparams.num_classes)
    if model.arch not in ("faster_rcnn", "mask_rcnn", "cascade_mask_rcnn", "retinanet"):
        raise ValueError(
            f"mmdet checkpoints map onto faster_rcnn, mask_rcnn, cascade_mask_rcnn or retinanet, not {model.arch}"
        )
    backbone = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    out = {f"model.{k}": v for k, v in _backbone_state(model, backbone).items()}
    mapper = _rules(model, num_classes)
    unmapped = []
    for key, value in state.items():
        if key.startswith("backbone."):
            continue
        mapped = mapper.map(key, value)
        if mapped is None:
            unmapped.append(key)
        else:
            out["model." + mapped[0]] = mapped[1]
    if unmapped:
        raise ValueError(
            f"{len(unmapped)} checkpoint keys have no place in a {model.arch} ({model.backbone_name}): "
            f"{unmapped[:8]}{' ...' if len(unmapped) > 8 else ''}; is it a {model.arch} checkpoint of this config?"
        )
    if num_classes == 80:
        module.categories = coco_categories()
    return out
