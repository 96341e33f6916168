"""Pooling token mixer (PoolFormer; Yu et al., "MetaFormer Is Actually What You Need for Vision", CVPR 2022).

``mixer(x) = avgpool_kxk(x) - x`` over the channels-last map (stride 1, ``count_include_pad=False``, so border tokens
average only real neighbours); subtracting ``x`` removes the identity the block's residual already adds. Registered as
the ``"pooling"`` token mixer so any stage of a hierarchical backbone can use it. The optional G1 output gate (see
:mod:`attnzoo.layers.gate`) scales the result by ``sigmoid(x W_g)`` per channel (``"elementwise"``) or per channel
group of ``dim / num_heads`` (``"headwise"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .gate import create_gate
from .mixer import MapTokenMixer, register_mixer

__all__ = ["PoolingMixer"]


@register_mixer("pooling")
class PoolingMixer(MapTokenMixer):
    """``(B, H, W, C) -> (B, H, W, C)``: ``avgpool(x) - x``, optionally gated.

    Args:
        dim: channels.
        num_heads: channel groups of a ``"headwise"`` gate (otherwise unused; pooling has no heads).
        pool_size: odd pooling window.
        gate: ``"none"``, ``"headwise"`` or ``"elementwise"``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        pool_size: int = 3,
        gate: str = "none",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if pool_size < 1 or pool_size % 2 == 0:
            raise ValueError(f"pool_size must be a positive odd int to keep the map size, got {pool_size}")
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.pool_size = pool_size
        self.gate = create_gate(gate, dim, num_heads, dim // num_heads, device=device, dtype=dtype)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, H, W, C)``. Returns ``(B, H, W, C)``."""
        pooled = F.avg_pool2d(
            x.permute(0, 3, 1, 2), self.pool_size, stride=1, padding=self.pool_size // 2, count_include_pad=False
        ).permute(0, 2, 3, 1)
        out = pooled - x
        if self.gate is not None:
            out = self.gate(x, out)
        return out

    def extra_repr(self) -> str:
        return f"pool_size={self.pool_size}"
