"""Window arithmetic shared by the Triton neighborhood-attention kernels (the in-kernel twin of :mod:`.windows`).

A program works on a tile of ``TILE`` consecutive group positions per axis of one dilation group. Tiles are numbered
group-major: tile ``t`` of an axis is tile ``t % tiles_per_group`` of group ``t // tiles_per_group``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def window_start(pos, group_len, KERNEL: tl.constexpr):
    """First group position of the window of the queries at group positions ``pos`` (NATTEN's border shift)."""
    return tl.minimum(tl.maximum(pos - KERNEL // 2, 0), group_len - KERNEL)


@triton.jit
def tile_origin(tile, tiles_per_group, dilation, padded_len, TILE: tl.constexpr):
    """``(group, first group position, group length)`` of axis tile ``tile``."""
    group = tile // tiles_per_group
    first = (tile % tiles_per_group) * TILE
    group_len = (padded_len - group + dilation - 1) // dilation
    return group, first, group_len


@triton.jit
def key_span(first, group_len, TILE: tl.constexpr, KERNEL: tl.constexpr):
    """``(start, length)`` of the union of the windows of the queries ``first .. first + TILE - 1``."""
    start = window_start(first, group_len, KERNEL)
    last = tl.minimum(first + TILE - 1, group_len - 1)
    return start, window_start(last, group_len, KERNEL) + KERNEL - start


@triton.jit
def query_span(first, group_len, TILE: tl.constexpr, KERNEL: tl.constexpr):
    """``(start, length)`` of the queries whose windows contain any of the keys ``first .. first + TILE - 1``
    (the inverse neighborhood: window starts grow monotonically with the query position)."""
    low = first - KERNEL + 1
    start = tl.where(low <= 0, 0, low + KERNEL // 2)
    last_key = tl.minimum(first + TILE - 1, group_len - 1)
    end = tl.where(last_key >= group_len - KERNEL, group_len - 1, last_key + KERNEL // 2)
    return start, end - start + 1


@triton.jit
def window_contains(start, pos, KERNEL: tl.constexpr):
    """Whether group position ``pos`` lies in the window starting at ``start`` (elementwise, broadcasting)."""
    return (pos >= start) & (pos < start + KERNEL)


@triton.jit
def map_tile_offsets(b, n, row, col, offs_d, stride_b, stride_n, stride_h, stride_w, stride_d):
    """Element offsets of the ``(len(row), len(offs_d))`` tile at pixels ``(row, col)`` of batch ``b`` and head ``n``
    of a strided ``(B, H, W, heads, D)`` map."""
    return b * stride_b + n * stride_n + row[:, None] * stride_h + col[:, None] * stride_w + offs_d[None, :] * stride_d
