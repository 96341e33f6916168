"""Bi-level routing attention (BiFormer) token mixers, channels-last ``(B, H, W, C) -> (B, H, W, C)``.

* ``"routing"`` — :class:`BiLevelRoutingAttention` (Zhu et al., 2023, "BiFormer", stages 1-3): one ``qkv`` Linear
  gives q | k | v (widths ``qk_dim``, ``qk_dim``, ``dim``); the map is split into ``n_win x n_win`` regions, every
  query region is routed to the ``topk`` key regions of highest region-mean affinity, and every query token attends
  to the tokens of those regions (:func:`attnzoo.kernels.routing.bra2d`, Triton on CUDA). The local context
  enhancement (LCE) adds a depthwise ``side_dwconv x side_dwconv`` conv of V to the output before the projection.
* ``"attention_lepe"`` — :class:`GlobalAttentionLePE` (BiFormer stage 4, ``topk=-2``): global attention whose LCE
  convolves the attention *input*.

Any input size. ``padding="zero"`` (default, official ``auto_pad``): the input is zero-padded at the bottom/right to
a multiple of ``n_win`` *before* the qkv projection (padded tokens carry the qkv bias and take part in routing,
attention and the LCE) and the output is cropped. ``padding="mask"``: q/k/v come from the unpadded input and the
padded tokens are excluded from routing and attention (``bra2d(..., padding="mask")``); the LCE convolves the
unpadded V map. Official checkpoints were trained at 224 px with ``n_win=7``, where no padding occurs and both agree.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from attnzoo.kernels.routing import bra2d
from attnzoo.kernels.routing.api import PADDINGS
from attnzoo.kernels.routing.reference import bra2d_reference

from .attention import Attention
from .gate import create_gate
from .mixer import MapTokenMixer, register_mixer


def _depthwise(dim: int, kernel_size: int, device=None, dtype=None) -> nn.Conv2d:
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"side_dwconv must be a positive odd kernel size, got {kernel_size}")
    return nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, device=device, dtype=dtype)


@register_mixer("routing")
class BiLevelRoutingAttention(MapTokenMixer):
    """Bi-level routing attention with local context enhancement and an optional output gate.

    Args:
        dim: input, value and output channels.
        num_heads: heads; must divide ``qk_dim`` and ``dim``.
        n_win: regions per side (the map is split into ``n_win x n_win`` regions whatever its size).
        topk: routed key regions per query region, ``1 <= topk <= n_win**2``.
        qk_dim: width of queries and keys (default ``dim``).
        qk_scale: logit scale; default ``qk_dim ** -0.5`` (the official scale, over the full width).
        side_dwconv: kernel of the depthwise LCE conv on V.
        gate: output gate on the attention output, ``"none"``, ``"headwise"``, ``"elementwise"`` or ``"moh"``.
        moh_topk, moh_shared_heads: routed heads active per token and always-active heads of ``gate="moh"``
            (mixture-of-head routing, :class:`~attnzoo.layers.MoHGate`).
        backend: routed-attention backend, ``"auto"``, ``"triton"`` or ``"reference"``.
        padding: ``"zero"`` (official: pad the input, padded tokens take part) or ``"mask"`` (padded tokens are
            excluded; see the module docstring).

    Parameters (``qkv``, ``lepe``, ``proj``) map one-to-one to the official ``qkv.qkv``, ``lepe``, ``wo``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        n_win: int = 7,
        topk: int = 4,
        qk_dim: int | None = None,
        qk_scale: float | None = None,
        side_dwconv: int = 5,
        gate: str = "none",
        moh_topk: int | None = None,
        moh_shared_heads: int = 0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        proj_drop: float = 0.0,
        backend: str = "auto",
        padding: str = "zero",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        qk_dim = qk_dim or dim
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
        if qk_dim % num_heads or dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide qk_dim ({qk_dim}) and dim ({dim})")
        if n_win < 1:
            raise ValueError(f"n_win must be positive, got {n_win}")
        if not 1 <= topk <= n_win * n_win:
            raise ValueError(f"topk must be in [1, n_win**2 = {n_win * n_win}], got {topk}")
        self.dim = dim
        self.qk_dim = qk_dim
        self.num_heads = num_heads
        self.n_win = n_win
        self.topk = topk
        self.scale = qk_scale or qk_dim**-0.5
        self.backend = backend
        self.padding = padding
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim, bias=qkv_bias, **dd)
        self.lepe = _depthwise(dim, side_dwconv, **dd)
        self.gate = create_gate(
            gate,
            dim,
            num_heads,
            dim // num_heads,
            bias=qkv_bias,
            moh_topk=moh_topk,
            moh_shared_heads=moh_shared_heads,
            **dd,
        )
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, H, W, dim)`` for any ``H, W``. Returns ``(B, H, W, dim)``."""
        B, H, W, C = x.shape
        n = self.n_win
        pad_h, pad_w = (0, 0) if self.padding == "mask" else (-(-H // n) * n - H, -(-W // n) * n - W)
        # while torch.compile traces, pad (maybe by zero) without branching on the size: one graph for every size
        padded = self.padding == "zero" and (torch.compiler.is_compiling() or pad_h > 0 or pad_w > 0)
        if padded:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w
        q, k, v = self.qkv(x).split([self.qk_dim, self.qk_dim, self.dim], dim=-1)
        heads = self.num_heads
        q = q.reshape(B, Hp, Wp, heads, self.qk_dim // heads)
        k = k.reshape(B, Hp, Wp, heads, self.qk_dim // heads)
        v_heads = v.reshape(B, Hp, Wp, heads, self.dim // heads)
        if torch.jit.is_scripting():
            out = bra2d_reference(q, k, v_heads, self.n_win, self.topk, self.scale, self.padding == "mask")[0]
        else:
            out = bra2d(
                q, k, v_heads, self.n_win, self.topk, scale=self.scale, backend=self.backend, padding=self.padding
            )
        out = out.reshape(B, Hp, Wp, self.dim)
        if self.gate is not None:
            out = self.gate(x, out)
        out = out + self.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        if padded:  # a contiguous crop: whether a view of it could be flattened would depend on the size
            out = out[:, :H, :W].clone(memory_format=torch.contiguous_format)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, qk_dim={self.qk_dim}, num_heads={self.num_heads}, n_win={self.n_win}, "
            f"topk={self.topk}, padding={self.padding}"
        )


@register_mixer("attention_lepe")
class GlobalAttentionLePE(Attention):
    """Global multi-head attention plus a depthwise conv of its input (BiFormer's last stage, ``AttentionLePE``):
    ``proj(gate(SDPA(q, k, v)) + DWConv(x))`` on ``(B, H, W, C)``. Keys ``qkv``, ``lepe``, ``proj`` as official; the
    arguments are :class:`Attention`'s."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        side_dwconv: int = 5,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        gate: str = "none",
        moh_topk: int | None = None,
        moh_shared_heads: int = 0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            proj_bias=proj_bias,
            gate=gate,
            moh_topk=moh_topk,
            moh_shared_heads=moh_shared_heads,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            device=device,
            dtype=dtype,
        )
        self.lepe = _depthwise(dim, side_dwconv, device=device, dtype=dtype)

    def forward(
        self,
        x: torch.Tensor,
        feat_size: list[int] | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """``x``: ``(B, H, W, C)``; ``attn_mask`` as :class:`Attention`'s over the ``H*W`` tokens. Returns
        ``(B, H, W, C)``."""
        B, H, W, C = x.shape
        out, _ = self._attend(x.reshape(B, H * W, C), attn_mask, is_causal)
        out = out.view(B, H, W, self.attn_dim) + self.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj_drop(self.proj(out))
