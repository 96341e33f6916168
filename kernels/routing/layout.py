"""Tensor layouts of the routed-attention op and the strides its Triton kernels address tokens with.

Two layouts share one addressing scheme, so the kernels read either without a partition copy:

* ``"regions"``: region-major ``(B, S*S, T, heads, D)``; region ``r`` is row ``r // S``, column ``r % S`` of the
  ``S x S`` region grid and holds ``T`` tokens.
* ``"map"``: channels-last ``(B, H, W, heads, D)`` with ``H`` and ``W`` multiples of ``S``; region ``r`` covers rows
  ``(r // S) * H/S ...`` and columns ``(r % S) * W/S ...``; its ``T = (H/S) * (W/S)`` tokens are numbered row-major.

Token ``t`` of region ``r`` lives at ``ry * s_ry + rx * s_rx + (t // region_w) * s_ty + (t % region_w) * s_tx``.
"""

from __future__ import annotations

import torch


def region_shape(x: torch.Tensor, n_win: int, layout: str) -> tuple[int, int]:
    """``(tokens_per_region, region_width)`` of ``x`` (5-D, in ``layout``) split into ``n_win x n_win`` regions."""
    if layout == "regions":
        return x.shape[2], x.shape[2]
    region_h, region_w = x.shape[1] // n_win, x.shape[2] // n_win
    return region_h * region_w, region_w


def token_strides(x: torch.Tensor, n_win: int, layout: str) -> tuple[int, int, int, int, int, int, int]:
    """Element strides ``(batch, region row, region col, token row, token col, head, channel)`` of ``x``."""
    s_b, s_1, s_2, s_h, s_d = x.stride()
    if layout == "regions":  # one region is a 1 x T strip
        return s_b, n_win * s_1, s_1, 0, s_2, s_h, s_d
    region_h, region_w = x.shape[1] // n_win, x.shape[2] // n_win
    return s_b, region_h * s_1, region_w * s_2, s_1, s_2, s_h, s_d
