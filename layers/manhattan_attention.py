"""Manhattan self-attention (RMT; Fan et al., CVPR 2024, "RMT: Retentive Networks Meet Vision Transformers").

Registered as the ``"manhattan"`` token mixer. Every head ``h`` weighs its keys by ``gamma_h ** (|dy| + |dx|)``, the
Manhattan distance to the query (additive mask ``(|dy| + |dx|) log(gamma_h)`` on the logits, as the official code
does), with ``gamma_h`` fixed by ``init_value`` and ``heads_range`` (:func:`attnzoo.layers.decay_masks.
manhattan_log_decay`). The decomposed form (RMT's early stages) attends along every row with ``|dx| log(gamma_h)``,
then along every column with ``|dy| log(gamma_h)`` — ``O(N (H + W))`` instead of ``O(N^2)``. The mask is shared by
the batch. ``attn_impl`` picks how the masked softmax runs: ``"sdpa"`` (``F.scaled_dot_product_attention`` with the
mask as a float ``attn_mask``; fused kernels on GPUs, no ``N x N`` attention matrix), ``"math"`` (explicit
``softmax(q k^T s + M) v``; on one CPU thread 2.5-5x faster than the CPU SDPA kernel with a float mask for the lines and
maps of 28-196 tokens of RMT at 224 px, 1.3x slower at 1024 tokens), ``"auto"``: SDPA on CUDA, math elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .decay_attention import DecayMaskedAttention
from .decay_masks import distance_mask_1d, manhattan_log_decay, manhattan_mask
from .mixer import register_mixer

__all__ = ["ATTN_IMPLS", "ManhattanAttention"]


ATTN_IMPLS = ("auto", "sdpa", "math")


def _masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, use_sdpa: bool
) -> torch.Tensor:
    """``softmax(q k^T scale + mask) v`` for ``(..., L, D)`` operands and a mask broadcastable to ``(..., L, L)``."""
    if use_sdpa:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return torch.softmax(q @ (k * scale).transpose(-1, -2) + mask, dim=-1) @ v


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``(B, heads, H, W, D) -> (B * H, heads, W, D)``: one sequence per row."""
    B, heads, H, W, D = t.shape
    return t.transpose(1, 2).reshape(B * H, heads, W, D)


def _columns(t: torch.Tensor) -> torch.Tensor:
    """``(B, heads, H, W, D) -> (B * W, heads, H, D)``: one sequence per column."""
    B, heads, H, W, D = t.shape
    return t.permute(0, 3, 1, 2, 4).reshape(B * W, heads, H, D)


@register_mixer("manhattan")
class ManhattanAttention(DecayMaskedAttention):
    """RMT's Manhattan self-attention on ``(B, H, W, C)`` maps, full or decomposed.

    Args:
        dim, num_heads, decomposed, lepe_kernel_size, qkv_bias, proj_bias, gate, proj_drop: see
            :class:`attnzoo.layers.decay_attention.DecayMaskedAttention`.
        init_value, heads_range: per-head decay ``gamma_h = 1 - 2 ** (-init_value - heads_range * h / num_heads)``.
        attn_impl: ``"auto"``, ``"sdpa"`` or ``"math"`` (see the module docstring); all compute the same.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        decomposed: bool = False,
        init_value: float = 2.0,
        heads_range: float = 4.0,
        attn_impl: str = "auto",
        lepe_kernel_size: int = 5,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        gate: str = "none",
        proj_drop: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            dim,
            num_heads,
            decomposed=decomposed,
            lepe_kernel_size=lepe_kernel_size,
            qkv_bias=qkv_bias,
            proj_bias=proj_bias,
            gate=gate,
            proj_drop=proj_drop,
            device=device,
            dtype=dtype,
        )
        if init_value <= 0 or heads_range < 0:
            raise ValueError(f"init_value must be > 0 and heads_range >= 0, got {init_value} and {heads_range}")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        self.attn_impl = attn_impl
        self.init_value = float(init_value)
        self.heads_range = float(heads_range)

    def log_gamma(self, device: torch.device) -> torch.Tensor:
        """Per-head ``log(gamma_h)``, ``(num_heads,)`` float32."""
        return manhattan_log_decay(self.num_heads, self.init_value, self.heads_range, device=device)

    def attend(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, heads, H, W, D = q.shape
        log_gamma = self.log_gamma(q.device)
        use_sdpa = self.attn_impl == "sdpa" or (self.attn_impl == "auto" and q.is_cuda)
        if not self.decomposed:
            mask = manhattan_mask(log_gamma, H, W).to(q.dtype)  # (heads, N, N)
            out = _masked_attention(q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3), mask, self.scale, use_sdpa)
            return out.view(B, heads, H, W, D)
        # along rows: (B * H, heads, W, D) with the |dx| mask
        mask_rows = distance_mask_1d(log_gamma, W).to(q.dtype)
        rows = _masked_attention(_rows(q), _rows(k), _rows(v), mask_rows, self.scale, use_sdpa)
        # then along columns: (B * W, heads, H, D) with the |dy| mask, on the row-attended values
        v_cols = rows.view(B, H, heads, W, D).permute(0, 3, 2, 1, 4).reshape(B * W, heads, H, D)
        mask_cols = distance_mask_1d(log_gamma, H).to(q.dtype)
        out = _masked_attention(_columns(q), _columns(k), v_cols, mask_cols, self.scale, use_sdpa)
        return out.view(B, W, heads, H, D).permute(0, 2, 3, 1, 4)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, init_value={self.init_value}, heads_range={self.heads_range}, "
            f"attn_impl={self.attn_impl}"
        )
