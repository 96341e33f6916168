"""The papers' decode heads, with mmseg's module names (so released mmseg checkpoints load key for key).

- :class:`UPerHead` (Xiao et al., 2018, as in mmseg): a pyramid pooling module (PPM) on the last map, lateral 1x1
  and FPN 3x3 conv-BN-ReLU on the others, a top-down pathway, every level upsampled to stride 4, concatenated and
  fused by a 3x3 bottleneck, then dropout and a 1x1 classifier ``conv_seg``.
- :class:`FCNHead`: the auxiliary head of the UperNet configs (3x3 conv-BN-ReLU blocks on one map, then
  ``conv_seg``), used for the training loss only.
- :class:`FPNHead`: Semantic FPN's head (Kirillov et al., 2019): per pyramid level, 3x3 conv-BN-ReLU blocks with 2x
  bilinear upsampling until stride 4, the levels summed, then ``conv_seg``.

All heads take the list of backbone (or pyramid) maps ``[(B, C_i, H_i, W_i), ...]`` and return logits
``(B, num_classes, H_0, W_0)`` at the resolution of their first input (the aux head: of the map it reads).
Resizing is bilinear with ``align_corners=False`` (mmseg's setting in every config here). State-dict keys are
mmcv's: a ``ConvModule`` holds ``conv`` (bias only without norm) and ``bn``; the classifier is ``conv_seg``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvModule", "FCNHead", "FPNHead", "PPM", "UPerHead", "resize"]


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of ``(B, C, H, W)`` to ``size`` ``(h, w)``, ``align_corners=False`` (a no-op at equal size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvModule(nn.Sequential):
    """mmcv's ``ConvModule`` as the papers' heads configure it: ``conv`` (no bias) -> ``bn`` -> ReLU,
    ``(B, C_in, H, W)`` -> ``(B, C_out, H, W)`` (stride 1, 'same' padding)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)


def _init_weights(module: nn.Module) -> None:
    """mmcv's initialisation: Kaiming-normal (fan-out, ReLU) convolutions of the ``ConvModule`` blocks, unit batch
    norms, and a classifier ``conv_seg`` drawn from N(0, 0.01) with zero bias."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d):
            if name.endswith("conv_seg"):
                nn.init.normal_(m.weight, std=0.01)
            else:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _DecodeHead(nn.Module):
    """mmseg's ``BaseDecodeHead`` tail: ``Dropout2d(dropout)`` then the 1x1 classifier ``conv_seg``."""

    def __init__(self, channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.num_classes = num_classes
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def cls_seg(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(x))


class PPM(nn.ModuleList):
    """Pyramid pooling: for each scale ``s``, adaptive average pooling to ``s x s`` and a 1x1 ``ConvModule``;
    ``(B, C, H, W)`` -> list of ``(B, channels, H, W)`` (each upsampled back)."""

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int) -> None:
        super().__init__(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvModule(in_channels, channels, 1)) for scale in pool_scales
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [resize(stage(x), x.shape[-2:]) for stage in self]


class UPerHead(_DecodeHead):
    """UPerNet's decode head (mmseg ``UPerHead``): maps ``[(B, in_channels[i], H_i, W_i)]`` (strides increasing)
    -> logits ``(B, num_classes, H_0, W_0)``."""

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int = 512,
        num_classes: int = 150,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__(channels, num_classes, dropout)
        in_channels = list(in_channels)
        if len(in_channels) < 2:
            raise ValueError(f"UPerHead needs at least two input maps, got in_channels={in_channels}")
        self.in_channels = in_channels
        self.psp_modules = PPM(pool_scales, in_channels[-1], channels)
        self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3)
        _init_weights(self)

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The last map through the PPM, concatenated with itself and fused: ``(B, channels, H, W)``."""
        return self.bottleneck(torch.cat([x, *self.psp_modules(x)], dim=1))

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(maps) != len(self.in_channels):
            raise ValueError(f"UPerHead expects {len(self.in_channels)} maps, got {len(maps)}")
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, maps)]
        laterals.append(self.psp_forward(maps[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: add the upsampled coarser level
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])]
        outs.append(laterals[-1])
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([resize(x, size) for x in outs], dim=1))
        return self.cls_seg(fused)


class FCNHead(_DecodeHead):
    """mmseg's ``FCNHead`` (``concat_input=False``): ``num_convs`` 3x3 ``ConvModule`` blocks on map ``in_index``
    ``(B, in_channels, H, W)`` -> logits ``(B, num_classes, H, W)``."""

    def __init__(
        self,
        in_channels: int,
        channels: int = 256,
        num_classes: int = 150,
        num_convs: int = 1,
        in_index: int = 2,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(channels, num_classes, dropout)
        if num_convs < 1:
            raise ValueError(f"num_convs must be >= 1, got {num_convs}")
        self.in_index = in_index
        self.convs = nn.Sequential(
            *(ConvModule(in_channels if k == 0 else channels, channels, 3) for k in range(num_convs))
        )
        _init_weights(self)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.cls_seg(self.convs(maps[self.in_index]))


class FPNHead(_DecodeHead):
    """Semantic FPN's head (mmseg ``FPNHead``): level ``i`` of stride ``s_i`` gets ``max(1, log2(s_i / s_0))``
    3x3 ``ConvModule`` blocks, each followed by a 2x bilinear upsampling unless ``s_i == s_0``; the levels are
    summed at the first level's size. Maps ``[(B, in_channels[i], H_i, W_i)]`` -> ``(B, num_classes, H_0, W_0)``."""

    def __init__(
        self,
        in_channels: Sequence[int],
        feature_strides: Sequence[int] = (4, 8, 16, 32),
        channels: int = 128,
        num_classes: int = 150,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(channels, num_classes, dropout)
        in_channels, feature_strides = list(in_channels), list(feature_strides)
        if len(in_channels) != len(feature_strides) or feature_strides != sorted(feature_strides):
            raise ValueError(
                f"need one increasing stride per input map, got in_channels={in_channels}, strides={feature_strides}"
            )
        self.in_channels = in_channels
        self.scale_heads = nn.ModuleList()
        for width, stride in zip(in_channels, feature_strides):
            layers: list[nn.Module] = []
            for k in range(max(1, int(math.log2(stride) - math.log2(feature_strides[0])))):
                layers.append(ConvModule(width if k == 0 else channels, channels, 3))
                if stride != feature_strides[0]:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        _init_weights(self)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(maps) != len(self.in_channels):
            raise ValueError(f"FPNHead expects {len(self.in_channels)} maps, got {len(maps)}")
        out = self.scale_heads[0](maps[0])
        for head, x in zip(self.scale_heads[1:], maps[1:]):
            out = out + resize(head(x), out.shape[-2:])
        return self.cls_seg(out)
