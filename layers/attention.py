"""Multi-head self-attention over all tokens, with an optional output gate.

Works on token sequences ``(B, N, C)`` (plain ViTs, class token included) and on channels-last maps
``(B, H, W, C)`` (registered as the ``"attention"`` token mixer). Parameter names follow timm's ``Attention``
(``qkv``, ``q_norm``, ``k_norm``, ``norm``, ``gate``, ``proj``) so timm ViT checkpoints load unchanged.
:meth:`Attention._attend` is the one attention core (``qkv -> SDPA -> norm -> gate``) that this mixer, BiFormer's
:class:`~attnzoo.layers.GlobalAttentionLePE` and token merging share.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm

from .gate import create_gate, gate_output
from .mixer import register_mixer


@register_mixer("attention")
class Attention(nn.Module):
    """Global multi-head self-attention through ``F.scaled_dot_product_attention``.

    Args:
        dim: input and output channels.
        num_heads: number of heads; ``head_dim = dim // num_heads`` unless given.
        qkv_bias: bias of the fused ``qkv`` projection.
        qk_norm: normalise queries and keys per head with ``norm_layer``.
        scale_norm: normalise the attention output (before the gate and projection) with ``norm_layer``.
        gate: output gate, ``"none"``, ``"headwise"``, ``"elementwise"`` or ``"moh"`` (see :mod:`attnzoo.layers.gate`).
        moh_topk, moh_shared_heads: routed heads active per token and always-active heads of ``gate="moh"``
            (mixture-of-head routing, :class:`~attnzoo.layers.MoHGate`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        gate: str = "none",
        moh_topk: int | None = None,
        moh_shared_heads: int = 0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
            head_dim = dim // num_heads
        norm_layer = norm_layer or LayerNorm
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * self.attn_dim, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = create_gate(
            gate, dim, num_heads, head_dim, bias=qkv_bias, moh_topk=moh_topk, moh_shared_heads=moh_shared_heads, **dd
        )
        self.proj = nn.Linear(self.attn_dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def _attend(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention core, ``qkv -> SDPA -> norm -> gate``, on tokens ``x`` ``(B, N, C)``.

        Returns the output before the projection ``(B, N, heads * head_dim)`` and the keys ``(B, heads, N,
        head_dim)`` (token merging's similarity metric). Reads only the sub-modules and attributes that timm's
        ``Attention`` has too (its ``gate`` is a plain ``Linear``, elementwise), so token merging runs it on either;
        a :class:`~attnzoo.layers.MoHGate` is called as a module.
        """
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0, is_causal=is_causal
        )
        out = self.norm(out.transpose(1, 2).reshape(B, N, self.attn_dim))
        if self.gate is not None:
            if hasattr(self.gate, "routed_heads"):  # a MoHGate (TorchScript resolves hasattr statically)
                out = self.gate(x, out)
            else:
                out = gate_output(out, F.linear(x, self.gate.weight, self.gate.bias), self.num_heads)
        return out, k

    def forward(
        self,
        x: torch.Tensor,
        feat_size: list[int] | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """``x``: ``(B, N, C)`` or ``(B, H, W, C)``; ``attn_mask``: bool or additive float, broadcastable to
        ``(B, heads, N, N)``; ``feat_size`` is not needed (global attention). Returns the input's shape."""
        out, _ = self._attend(x.flatten(1, -2), attn_mask, is_causal)
        out = self.proj_drop(self.proj(out))
        return out.view(x.shape[:-1] + out.shape[-1:])
