"""The pre-norm transformer block every family composes.

``x = x + cpe(x)`` (optional depthwise-conv conditional position encoding, maps only), then
``x = x + drop_path(ls1(mixer(norm1(x))))`` and ``x = x + drop_path(ls2(mlp(norm2(x))))``.
Works channels-last on maps ``(B, H, W, C)`` and on token sequences ``(B, N, C)``. Sub-module names follow timm's ViT
``Block`` (``norm1``, ``attn``, ``ls1``, ``norm2``, ``mlp``, ``ls2``) so timm and official checkpoints map directly.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import DropPath, LayerNorm, LayerScale, Mlp


class ConvPosEnc(nn.Conv2d):
    """Conditional position encoding: ``x + DWConv_kxk(x)`` on a channels-last map ``(B, H, W, C)``."""

    def __init__(self, dim: int, kernel_size: int = 3, device=None, dtype=None) -> None:
        if kernel_size % 2 == 0:
            raise ValueError(f"cpe kernel_size must be odd to keep the map size, got {kernel_size}")
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self._conv_forward(x.permute(0, 3, 1, 2), self.weight, self.bias).permute(0, 2, 3, 1)


class TransformerBlock(nn.Module):
    """Pre-norm block around any token mixer.

    ``forward(x, feat_size, attn_mask, is_causal)`` hands its arguments to the mixer in the one call form of every
    token mixer (see :mod:`attnzoo.layers.mixer`): the patch grid of a token sequence, and attention masks, which a
    mixer that takes none rejects with ``ValueError``.

    Args:
        dim: channels.
        mixer: the token mixer module (``attn``), mapping the block's layout to itself.
        mlp_ratio: hidden width of the MLP relative to ``dim``.
        drop_path: stochastic depth rate of both residual branches.
        layer_scale_init_value: enables layer scale (``ls1``/``ls2``) with this initial value.
        cpe_kernel_size: kernel of the conditional position encoding applied first (maps only); 0 disables it.
        proj_drop: dropout after the MLP layers.
    """

    def __init__(
        self,
        dim: int,
        mixer: nn.Module,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        layer_scale_init_value: float | None = None,
        cpe_kernel_size: int = 0,
        proj_drop: float = 0.0,
        mlp_bias: bool = True,
        norm_layer: type[nn.Module] = LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        mlp_layer: type[nn.Module] = Mlp,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.pos_embed = ConvPosEnc(dim, cpe_kernel_size, **dd) if cpe_kernel_size else nn.Identity()
        self.norm1 = norm_layer(dim, **dd)
        self.attn = mixer
        self.ls1 = LayerScale(dim, layer_scale_init_value, **dd) if layer_scale_init_value else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = mlp_layer(
            in_features=dim,
            hidden_features=int(dim * mlp_ratio),
            act_layer=act_layer,
            bias=mlp_bias,
            drop=proj_drop,
            **dd,
        )
        self.ls2 = LayerScale(dim, layer_scale_init_value, **dd) if layer_scale_init_value else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        feat_size: list[int] | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """``x``: ``(B, H, W, C)`` or ``(B, N, C)``; ``feat_size``, ``attn_mask``, ``is_causal`` go to the mixer."""
        x = self.pos_embed(x)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), feat_size, attn_mask, is_causal)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
