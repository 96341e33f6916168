"""The parts that RMT's Manhattan self-attention and PPMA's polyline path masked attention share.

Both mixers map a channels-last map ``(B, H, W, C) -> (B, H, W, C)`` for any ``H, W``: a fused ``qkv`` projection,
the rotary embedding on queries and keys (raster index, see :mod:`attnzoo.layers.decay_masks`), a decay-masked
attention (the subclass's :meth:`DecayMaskedAttention.attend`), plus the local position term of the official models
(``lepe``, a depth-wise ``k x k`` convolution of the values added to the attention output), then the optional output
gate (on that sum) and the output projection.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .decay_masks import apply_rotary, raster_rotary_tables
from .gate import create_gate
from .mixer import MapTokenMixer

__all__ = ["DecayMaskedAttention"]


class DecayMaskedAttention(MapTokenMixer):
    """Base of the decay-masked attention mixers.

    Args:
        dim: input and output channels.
        num_heads: heads; ``head_dim = dim // num_heads`` must be even (rotary pairs).
        decomposed: attend along rows, then along columns (the early-stage form of RMT / PPMA) instead of over the
            whole map with the 2-D mask.
        lepe_kernel_size: kernel of the depth-wise convolution of the values (odd).
        qkv_bias, proj_bias: biases of the projections (and of the gate).
        gate: output gate, ``"none"``, ``"headwise"`` or ``"elementwise"`` (see :mod:`attnzoo.layers.gate`).
        proj_drop: dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        decomposed: bool = False,
        lepe_kernel_size: int = 5,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        gate: str = "none",
        proj_drop: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if (dim // num_heads) % 2:
            raise ValueError(f"head_dim = dim // num_heads must be even (rotary pairs), got {dim // num_heads}")
        if lepe_kernel_size < 1 or lepe_kernel_size % 2 == 0:
            raise ValueError(f"lepe_kernel_size must be a positive odd int, got {lepe_kernel_size}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.decomposed = decomposed
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.lepe = nn.Conv2d(dim, dim, lepe_kernel_size, padding=lepe_kernel_size // 2, groups=dim, **dd)
        self.gate = create_gate(gate, dim, num_heads, self.head_dim, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def attend(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Masked attention of rotated ``q``, ``k`` and ``v``, all ``(B, heads, H, W, head_dim)``, for the mixer
        input ``x`` ``(B, H, W, C)``. Returns ``(B, heads, H, W, head_dim)``."""
        raise NotImplementedError

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, H, W, C)`` for any ``H, W``. Returns ``(B, H, W, C)``."""
        B, H, W, C = x.shape
        qkv = self.qkv(x)
        q, k, v = qkv.view(B, H, W, 3, self.num_heads, self.head_dim).permute(3, 0, 4, 1, 2, 5).unbind(0)
        sin, cos = raster_rotary_tables(H, W, self.head_dim, device=x.device, dtype=x.dtype)
        q, k = apply_rotary(q, sin, cos), apply_rotary(k, sin, cos)
        out = self.attend(x, q, k, v).permute(0, 2, 3, 1, 4).reshape(B, H, W, C)
        values = qkv[..., 2 * C :].permute(0, 3, 1, 2)
        out = out + self.lepe(values).permute(0, 2, 3, 1)
        if self.gate is not None:
            out = self.gate(x, out)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, decomposed={self.decomposed}"
