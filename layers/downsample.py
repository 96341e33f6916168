"""Downsampling between stages, channels-last ``(B, H, W, C_in) -> (B, ceil(H / 2), ceil(W / 2), C_out)``."""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import LayerNorm2d
from timm.models.swin_transformer import PatchMerging

__all__ = ["ConvDownsample", "PatchMerging"]


class ConvDownsample(nn.Module):
    """Strided convolution + norm (NAT: 3x3/2 conv without bias + LayerNorm; BiFormer: with bias + BatchNorm).

    The norm acts on the NCHW conv output (``LayerNorm2d`` equals a channels-last ``LayerNorm``).
    """

    stride = 2

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        kernel_size: int = 3,
        bias: bool = False,
        norm_layer: type[nn.Module] | None = LayerNorm2d,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.reduction = nn.Conv2d(in_dim, out_dim, kernel_size, stride=2, padding=kernel_size // 2, bias=bias, **dd)
        self.norm = norm_layer(out_dim, **dd) if norm_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
