"""Polyline path masked attention (PPMA; Zhao et al., NeurIPS 2025, "Polyline Path Masked Attention for Vision
Transformer").

Registered as the ``"polyline"`` token mixer. Mamba2's structured mask adapted to 2-D: every token ``t`` predicts a
horizontal and a vertical decay per head, ``alpha_t = -exp(A_log) * softplus(x_t W_dt[0] + dt_bias)`` and
``beta_t`` likewise with ``W_dt[1]`` (``x_t`` the head's ``head_dim`` channels of the mixer input; ``W_dt`` is shared
by the heads, ``dt_bias`` and ``A_log`` are per head, initialised as Mamba2's). The polyline path mask weighs a key by
the product of the decays along the L-shaped path from the query (:func:`attnzoo.layers.decay_masks.
polyline_path_mask`); like the official model, the attention averages the two polylines, horizontal first (``M``)
and vertical first (``M^T``): ``A = (softmax(q k^T s + M) + softmax(q k^T s + M^T)) / 2``.

The decomposed form (the early stages of PPMA) attends along rows with the row masks and along columns with the column
masks, in both orders, and averages: ``(A_col A_row + A_row A_col) v / 2``.

The logits, both softmaxes and the products are explicit matmuls (one ``q k^T`` and one ``A v`` per map or line, as in
the official model), not SDPA, which would compute ``q k^T`` once per softmax.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .decay_attention import DecayMaskedAttention
from .decay_masks import add_polyline_path_mask, polyline_line_masks
from .mixer import register_mixer

__all__ = ["PolylineAttention"]


@register_mixer("polyline")
class PolylineAttention(DecayMaskedAttention):
    """PPMA's polyline path masked attention on ``(B, H, W, C)`` maps, full or decomposed.

    Args:
        dim, num_heads, decomposed, lepe_kernel_size, qkv_bias, proj_bias, gate, proj_drop: see
            :class:`attnzoo.layers.decay_attention.DecayMaskedAttention`.
        a_init_range: range of the uniform initialisation of ``A = exp(A_log)``.
        dt_min, dt_max, dt_init_floor: log-uniform initialisation of ``softplus(dt_bias)`` (Mamba2's).
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
        a_init_range: tuple[float, float] = (1.0, 1.1),
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
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
        if not 0 < a_init_range[0] <= a_init_range[1]:
            raise ValueError(f"a_init_range must satisfy 0 < low <= high, got {a_init_range}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"dt_min and dt_max must satisfy 0 < dt_min <= dt_max, got {dt_min} and {dt_max}")
        dd = {"device": device, "dtype": dtype}
        self.a_init_range = (float(a_init_range[0]), float(a_init_range[1]))
        self.dt_range = (float(dt_min), float(dt_max), float(dt_init_floor))
        self.dt_proj = nn.Linear(self.head_dim, 2, bias=False, **dd)
        self.dt_bias = nn.Parameter(torch.empty(num_heads, **dd))
        self.A_log = nn.Parameter(torch.empty(num_heads, **dd))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba2's initialisation: ``softplus(dt_bias)`` log-uniform in ``[dt_min, dt_max]`` (floored), ``A``
        uniform in ``a_init_range``. Meta tensors (no values) are left as they are."""
        if self.dt_bias.device.type == "meta":
            return
        dt_min, dt_max, floor = self.dt_range
        dt = torch.exp(torch.rand_like(self.dt_bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        self.A_log.copy_(torch.log(torch.empty_like(self.A_log).uniform_(*self.a_init_range)))

    def no_weight_decay(self) -> set[str]:
        return {"dt_bias", "A_log"}

    def log_decays(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token horizontal and vertical log decays ``alpha``, ``beta`` ``(B, heads, H, W)`` (all < 0) of the
        mixer input ``x`` ``(B, H, W, C)``."""
        B, H, W, _ = x.shape
        dt = self.dt_proj(x.view(B, H, W, self.num_heads, self.head_dim))  # (B, H, W, heads, 2)
        dt = F.softplus(dt + self.dt_bias[:, None]) * -torch.exp(self.A_log)[:, None]
        alpha, beta = dt.permute(4, 0, 3, 1, 2).unbind(0)
        return alpha, beta

    def attend(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, heads, H, W, D = q.shape
        alpha, beta = self.log_decays(x)
        k = k * self.scale
        if not self.decomposed:
            logits = q.flatten(2, 3) @ k.flatten(2, 3).transpose(-1, -2)  # (B, heads, N, N)
            attn = torch.softmax(add_polyline_path_mask(logits, alpha, beta), dim=-1)
            attn = attn + torch.softmax(add_polyline_path_mask(logits, alpha, beta, vertical_first=True), dim=-1)
            return ((attn @ v.flatten(2, 3)) * 0.5).view(B, heads, H, W, D)
        row_masks, col_masks = polyline_line_masks(alpha, beta)  # (B, heads, H, W, W), (B, heads, W, H, H)
        attn_rows = torch.softmax(q @ k.transpose(-1, -2) + row_masks, dim=-1)  # (B, heads, H, W, W)
        q_cols, k_cols, v_cols = q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3)  # (B, heads, W, H, D)
        attn_cols = torch.softmax(q_cols @ k_cols.transpose(-1, -2) + col_masks, dim=-1)  # (B, heads, W, H, H)
        rows_then_cols = (attn_cols @ (attn_rows @ v).transpose(2, 3)).transpose(2, 3)
        cols_then_rows = attn_rows @ (attn_cols @ v_cols).transpose(2, 3)
        return (rows_then_cols + cols_then_rows) * 0.5
