"""Stems: image ``(B, in_chans, H, W)`` -> channels-last tokens ``(B, H / stride, W / stride, C)``."""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import LayerNorm2d


class ConvStem(nn.Module):
    """Two 3x3 stride-2 convolutions (stride 4 in all), optionally with a norm/activation between them and a norm
    after (NAT: no mid norm/act, LayerNorm after; BiFormer: BatchNorm + GELU between, BatchNorm after).

    Norm layers act on NCHW maps (``LayerNorm2d``, ``BatchNorm2d``); the output is channels-last.
    """

    stride = 4

    def __init__(
        self,
        in_chans: int,
        embed_dim: int,
        hidden_dim: int | None = None,
        norm_layer: type[nn.Module] | None = LayerNorm2d,
        mid_norm_layer: type[nn.Module] | None = None,
        act_layer: type[nn.Module] | None = None,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        hidden_dim = hidden_dim or embed_dim // 2
        layers: list[nn.Module] = [nn.Conv2d(in_chans, hidden_dim, 3, stride=2, padding=1, bias=bias, **dd)]
        if mid_norm_layer is not None:
            layers.append(mid_norm_layer(hidden_dim, **dd))
        if act_layer is not None:
            layers.append(act_layer())
        layers.append(nn.Conv2d(hidden_dim, embed_dim, 3, stride=2, padding=1, bias=bias, **dd))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim, **dd) if norm_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x)).permute(0, 2, 3, 1)


class OverlapPatchEmbed(nn.Module):
    """Overlapping patch embedding: one ``patch_size`` conv with ``stride`` and ``patch_size // 2`` padding, then a
    norm (PVTv2-style stems and stage transitions). NCHW in, channels-last out."""

    def __init__(
        self,
        in_chans: int,
        embed_dim: int,
        patch_size: int = 7,
        stride: int = 4,
        norm_layer: type[nn.Module] | None = LayerNorm2d,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.stride = stride
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=stride, padding=patch_size // 2, **dd)
        self.norm = norm_layer(embed_dim, **dd) if norm_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x)).permute(0, 2, 3, 1)


class DeepConvStem(nn.Module):
    """Four 3x3 convolutions, strides 2-1-2-1 (stride 4 in all), widths ``C/2, C/2, C, C``, each followed by a norm
    and all but the last by an activation (RMT / PPMA; ``proj.{0, 3, 6, 9}`` are the convolutions, ``proj.{1, 4, 7,
    10}`` the norms). NCHW in, channels-last out."""

    stride = 4

    def __init__(
        self,
        in_chans: int,
        embed_dim: int,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        act_layer: type[nn.Module] = nn.GELU,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        widths = (embed_dim // 2, embed_dim // 2, embed_dim, embed_dim)
        layers: list[nn.Module] = []
        in_width = in_chans
        for i, (width, stride) in enumerate(zip(widths, (2, 1, 2, 1))):
            layers += [nn.Conv2d(in_width, width, 3, stride=stride, padding=1, **dd), norm_layer(width, **dd)]
            if i < len(widths) - 1:
                layers.append(act_layer())
            in_width = width
        self.proj = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)
