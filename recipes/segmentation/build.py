"""``build_segmenter``: UperNet or Semantic FPN on any zoo (or timm) backbone, structured like mmseg's models.

The backbone comes from the detection recipe's adapter (:func:`~attnzoo.recipes.detection.backbones.build_backbone`):
a hierarchical model's stage maps (UperNet) or their FPN (Semantic FPN), a plain ViT's simple feature pyramid. State
dict layout (what :mod:`attnzoo.weights.mmseg` maps a released mmseg checkpoint onto):

- ``backbone.body.model.*``: the timm model (mmseg ``backbone.*``);
- ``backbone.fpn.{inner_blocks,layer_blocks}.i.0.*``: Semantic FPN's neck (mmseg ``neck.{lateral,fpn}_convs.i.conv.*``);
- ``decode_head.*`` and ``auxiliary_head.*``: mmseg's names.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import timm
import torch
from torch import nn

from ..detection.backbones import FeatureBackbone, ViTDetBackbone, build_backbone, is_plain_vit
from .heads import FCNHead, FPNHead, UPerHead, resize

__all__ = ["DECODERS", "Segmenter", "build_segmenter"]

DECODERS = ("upernet", "fpn")


class Segmenter(nn.Module):
    """Backbone (+ neck) + decode head (+ auxiliary head, training only) of a semantic segmentation model.

    ``forward(images)``: ``(B, 3, H, W)`` float images in [0, 1] (normalised inside with the backbone's mean / std)
    -> logits ``(B, num_classes, H, W)`` (the decode head's stride-4 logits resized bilinearly, as mmseg's
    ``encode_decode``). :meth:`forward_train` returns the unresized logits of both heads for the loss.
    """

    def __init__(
        self,
        backbone: FeatureBackbone | ViTDetBackbone,
        decode_head: nn.Module,
        auxiliary_head: nn.Module | None,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.num_classes = decode_head.num_classes
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The maps the heads read: ``[(B, C_i, H / s_i, W / s_i), ...]``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        return list(self.backbone(x).values())

    def forward_train(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of the decode head ``(B, K, H / 4, W / 4)`` and of the auxiliary head (``None`` without one)."""
        maps = self.features(images)
        aux = self.auxiliary_head(maps) if self.auxiliary_head is not None else None
        return self.decode_head(maps), aux

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return resize(self.decode_head(self.features(images)), images.shape[-2:])


def build_segmenter(
    decoder: str,
    backbone: str,
    num_classes: int,
    *,
    pretrained_backbone: bool | str | os.PathLike = False,
    aux_head: bool | None = None,
    channels: int | None = None,
    out_indices: Sequence[int] = (0, 1, 2, 3),
    fpn_channels: int = 256,
    pool_scales: Sequence[int] = (1, 2, 3, 6),
    aux_channels: int = 256,
    aux_index: int = 2,
    dropout: float = 0.1,
    frozen_stages: int = -1,
    norm_eval: bool = False,
    **backbone_kwargs: Any,
) -> Segmenter:
    """A semantic segmentation model: ``decoder`` ``"upernet"`` (mmseg ``UPerHead`` + ``FCNHead`` auxiliary head)
    or ``"fpn"`` (Semantic FPN: FPN neck + ``FPNHead``) on the timm model ``backbone``.

    Args:
        num_classes: classes of the classifier (ADE20K: 150).
        pretrained_backbone: ``True`` (the model's cfg weights) or a classification checkpoint / exported folder.
        aux_head: the auxiliary FCN head on map ``aux_index`` (training loss only); ``None``: the papers' setting
            (UperNet with, Semantic FPN without).
        channels: decode head width (default: UperNet 512, Semantic FPN 128).
        out_indices: backbone stages used (strides 4-32 for the four defaults).
        fpn_channels: Semantic FPN's neck width (256); plain ViTs under UperNet get a simple feature pyramid of
            this width too.
        pool_scales: UperNet's PPM scales; ``aux_channels``: the auxiliary head's width; ``dropout``: before both
            classifiers.
        frozen_stages, norm_eval: see :func:`~attnzoo.recipes.detection.backbones.build_backbone`.
        backbone_kwargs: ``timm.create_model`` arguments (``drop_path_rate``, the families' downstream options...).
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}; got {decoder!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if channels is not None and channels < 1:
        raise ValueError(f"channels must be positive, got {channels}")
    if not timm.is_model(backbone):
        from ..module import check_model_name

        check_model_name(backbone)
    # UperNet reads a hierarchical model's stage maps; Semantic FPN, and any decoder on a plain ViT, a pyramid
    pyramid = decoder == "fpn" or is_plain_vit(backbone, **backbone_kwargs)
    body = build_backbone(
        backbone,
        extra=None,
        pretrained=pretrained_backbone,
        out_indices=out_indices,
        fpn_channels=fpn_channels if pyramid else None,
        frozen_stages=frozen_stages,
        norm_eval=norm_eval,
        **backbone_kwargs,
    )
    in_channels = body.channels
    if decoder == "upernet":
        head: nn.Module = UPerHead(in_channels, channels or 512, num_classes, pool_scales, dropout)
    else:
        head = FPNHead(in_channels, body.strides, channels or 128, num_classes, dropout)
    aux = None
    if aux_head or (aux_head is None and decoder == "upernet"):
        if not 0 <= aux_index < len(in_channels):
            raise ValueError(f"aux_index must be in [0, {len(in_channels)}) (one per backbone map), got {aux_index}")
        aux = FCNHead(in_channels[aux_index], aux_channels, num_classes, in_index=aux_index, dropout=dropout)
    cfg = body.pretrained_cfg
    model = Segmenter(body, head, aux, cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225)))
    model.decoder, model.backbone_name = decoder, backbone
    return model
