"""Spatial decay masks of RMT's Manhattan self-attention and PPMA's polyline path masked attention, and the rotary
embedding both use.

Masks are additive and in the log domain: ``softmax(q k^T s + M)`` weighs each key by ``exp(M)``, the product of the
decay factors along the path from query to key (the papers write ``softmax(q k^T s) * D``; the official code adds
``log D`` to the logits, which is what these functions build).

* Manhattan (RMT, Fan et al., CVPR 2024): ``M[i, j] = (|y_i - y_j| + |x_i - x_j|) * log(gamma_h)`` with one fixed
  ``gamma_h`` per head, ``log(gamma_h) = log(1 - 2 ** (-init_value - heads_range * h / heads))``. The decomposed form
  attends along rows with ``|x_i - x_j| log(gamma)`` and then along columns with ``|y_i - y_j| log(gamma)``.
* Polyline path (PPMA, Zhao et al., NeurIPS 2025): every token ``t`` carries a horizontal and a vertical log decay
  ``alpha_t, beta_t <= 0`` (per head). Along one line the structured mask of Mamba2 is ``L[i, j] =`` the sum of the
  decays of the tokens in ``(min(i, j), max(i, j)]`` (:func:`segment_sum_mask`). The 2-D mask follows the polyline
  from query ``(a, c)`` along its row ``a`` to column ``c'``, then along column ``c'`` to the key ``(b, c')``:
  ``M[(a, c), (b, c')] = L_row_a(alpha)[c, c'] + L_col_c'(beta)[a, b]``; the other polyline (vertical first) gives
  its transpose. The paper's efficient algorithm builds it from
  the ``H + W`` one-dimensional masks by broadcasting (``O(N^2)`` for ``N = H W`` tokens, never a loop over pairs or
  paths); :func:`polyline_path_mask`, or added straight to the logits by :func:`add_polyline_path_mask`.

The rotary embedding of both official models rotates channel pairs ``(2m, 2m+1)`` of queries and keys by the angle
``p * theta_m`` with ``p = y * W + x`` the raster index of the token and ``theta_m = 10000 ** (-m / (D/2 - 1))``
(``torch.linspace(0, 1, D/2)`` exponents): :func:`raster_rotary_tables`, :func:`apply_rotary`.
"""

from __future__ import annotations

import torch

__all__ = [
    "add_polyline_path_mask",
    "apply_rotary",
    "distance_mask_1d",
    "manhattan_log_decay",
    "manhattan_mask",
    "polyline_line_masks",
    "polyline_path_mask",
    "raster_rotary_tables",
    "segment_sum_mask",
]


def manhattan_log_decay(
    num_heads: int, init_value: float = 2.0, heads_range: float = 4.0, device: torch.device | None = None
) -> torch.Tensor:
    """RMT's per-head ``log(gamma_h) = log(1 - 2 ** (-init_value - heads_range * h / num_heads))``, ``(num_heads,)``
    float32 (negative; heads with larger ``h`` decay more slowly)."""
    heads = torch.arange(num_heads, dtype=torch.float32, device=device)
    return torch.log(1 - torch.pow(2.0, -init_value - heads_range * heads / num_heads))


def distance_mask_1d(log_gamma: torch.Tensor, length: int) -> torch.Tensor:
    """``(heads,)`` log decays -> ``(heads, length, length)`` mask ``|i - j| * log_gamma``."""
    index = torch.arange(length, device=log_gamma.device, dtype=log_gamma.dtype)
    return (index[:, None] - index[None, :]).abs() * log_gamma[:, None, None]


def manhattan_mask(log_gamma: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(heads,)`` log decays -> ``(heads, N, N)`` mask ``(|dy| + |dx|) * log_gamma`` over the ``height x width``
    grid in raster order (``N = height * width``)."""
    ys = torch.arange(height, device=log_gamma.device, dtype=log_gamma.dtype)
    xs = torch.arange(width, device=log_gamma.device, dtype=log_gamma.dtype)
    dy = (ys[:, None] - ys[None, :]).abs()  # (H, H)
    dx = (xs[:, None] - xs[None, :]).abs()  # (W, W)
    dist = dy[:, None, :, None] + dx[None, :, None, :]  # (H, W, H, W): [query y, query x, key y, key x]
    n = height * width
    return dist.reshape(1, n, n) * log_gamma[:, None, None]


def segment_sum_mask(log_decay: torch.Tensor) -> torch.Tensor:
    """Mamba2's structured mask along the last axis, made symmetric: ``(..., L)`` per-token log decays ->
    ``(..., L, L)`` with ``M[..., i, j] = sum(log_decay[..., min(i, j) + 1 : max(i, j) + 1])`` (0 on the diagonal).

    Computed from one cumulative sum: ``cs[i] - cs[j]`` below the diagonal, ``cs[j] - cs[i]`` above it.
    """
    cs = torch.cumsum(log_decay, dim=-1)
    diff = cs[..., :, None] - cs[..., None, :]
    length = log_decay.shape[-1]
    index = torch.arange(length, device=log_decay.device)
    lower = index[:, None] >= index[None, :]
    return torch.where(lower, diff, -diff)


def polyline_line_masks(alpha: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1-D masks of every row and column: ``alpha``, ``beta`` ``(B, heads, H, W)`` horizontal / vertical log
    decays -> row masks ``(B, heads, H, W, W)`` (from ``alpha`` along each row) and column masks
    ``(B, heads, W, H, H)`` (from ``beta`` along each column)."""
    if alpha.shape != beta.shape or alpha.ndim != 4:
        raise ValueError(f"alpha and beta must both be (B, heads, H, W), got {alpha.shape} and {beta.shape}")
    return segment_sum_mask(alpha), segment_sum_mask(beta.transpose(-1, -2))


def _polyline_parts(alpha: torch.Tensor, beta: torch.Tensor, vertical_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The row and column parts of the polyline path mask, broadcastable to ``(B, heads, H, W, H, W)``
    (``[query row, query column, key row, key column]``)."""
    rows, cols = polyline_line_masks(alpha, beta)  # (B, h, H, W, W) [y, x, x'], (B, h, W, H, H) [x, y, y']
    if vertical_first:
        row_part = rows.permute(0, 1, 3, 2, 4).unsqueeze(2)  # [b, c, c'] -> (B, h, 1, W, H, W) [a, c, b, c']
        col_part = cols.permute(0, 1, 3, 2, 4).unsqueeze(-1)  # [c, a, b] -> (B, h, H, W, H, 1)
    else:
        row_part = rows.unsqueeze(4)  # [a, c, c'] -> (B, h, H, W, 1, W)
        col_part = cols.permute(0, 1, 3, 4, 2).unsqueeze(3)  # [c', a, b] -> (B, h, H, 1, H, W)
    return row_part, col_part


def polyline_path_mask(alpha: torch.Tensor, beta: torch.Tensor, vertical_first: bool = False) -> torch.Tensor:
    """PPMA's 2-D polyline path mask ``(B, heads, N, N)`` (``N = H * W``, raster order) from the per-token log
    decays ``alpha`` (horizontal) and ``beta`` (vertical), both ``(B, heads, H, W)``.

    From query ``(a, c)`` to key ``(b, c')``: along row ``a``, then column ``c'``,
    ``M[(a, c), (b, c')] = row_a[c, c'] + col_c'[a, b]``; with ``vertical_first``, along column ``c``, then row ``b``,
    ``row_b[c, c'] + col_c[a, b]`` — the transpose of the first (the 1-D masks are symmetric), built contiguous. Each
    line part is broadcast over the other axis of the pair.
    """
    B, heads, H, W = alpha.shape
    row_part, col_part = _polyline_parts(alpha, beta, vertical_first)
    return (row_part + col_part).reshape(B, heads, H * W, H * W)


def add_polyline_path_mask(
    logits: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, vertical_first: bool = False
) -> torch.Tensor:
    """``logits + polyline_path_mask(alpha, beta, vertical_first)`` for ``logits`` ``(B, heads, N, N)``, without
    materialising the mask: its row and column parts are added to the logits in turn (one ``N x N`` pass less)."""
    B, heads, H, W = alpha.shape
    row_part, col_part = _polyline_parts(alpha, beta, vertical_first)
    out = logits.view(B, heads, H, W, H, W) + row_part
    out += col_part
    return out.view(B, heads, H * W, H * W)


def raster_rotary_tables(
    height: int, width: int, head_dim: int, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sin``, ``cos`` tables ``(height, width, head_dim)`` of the rotary embedding on the raster index (computed in
    float32, then cast to ``dtype``)."""
    if head_dim % 2:
        raise ValueError(f"the rotary embedding needs an even head_dim, got {head_dim}")
    theta = 1.0 / (10000 ** torch.linspace(0, 1, head_dim // 2, device=device))
    theta = theta.repeat_interleave(2)  # (head_dim,): one angle per channel pair
    angle = torch.arange(height * width, device=device, dtype=torch.float32)[:, None] * theta[None, :]
    sin, cos = torch.sin(angle), torch.cos(angle)
    if dtype is None:
        dtype = torch.float32
    return sin.view(height, width, head_dim).to(dtype), cos.view(height, width, head_dim).to(dtype)


def apply_rotary(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate the channel pairs of ``x`` ``(..., H, W, D)``: ``(x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)``."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return x * cos + rotated * sin
