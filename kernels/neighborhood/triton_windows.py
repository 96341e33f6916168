"""Window arithmetic shared by the Triton neighborhood-attention kernels (the in-kernel twin of :mod:`.windows`).

A program works on a tile of ``TILE`` consecutive group positions per axis of one dilation group. Tiles are numbered
group-major: tile ``t`` of an axis is tile ``t % tiles_per_group`` of group ``t // tiles_per_group``; the 2-D tiles of
a launch are numbered row-major (``tiles_w`` per row). The forward and both backward kernels build their tiles, walk
their spans and bias their logits with the same functions below, so each piece of window arithmetic is written once.
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


@triton.jit
def map_load(ptr, b, n, row, col, offs_d, stride_b, stride_n, stride_h, stride_w, stride_d, mask):
    """The ``(len(row), len(offs_d))`` rows at pixels ``(row, col)`` of a strided ``(B, H, W, heads, D)`` map (zeros
    where ``mask`` is off)."""
    offsets = map_tile_offsets(b, n, row, col, offs_d, stride_b, stride_n, stride_h, stride_w, stride_d)
    return tl.load(ptr + offsets, mask=mask, other=0.0)


@triton.jit
def program_tile(
    pid_tile, tiles_w, tiles_per_group_h, tiles_per_group_w, dil_h, dil_w, padded_h, padded_w,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr,
):  # fmt: skip
    """``(group_h, first_h, len_h, group_w, first_w, len_w)`` of the 2-D tile of program ``pid_tile``."""
    group_h, first_h, len_h = tile_origin(pid_tile // tiles_w, tiles_per_group_h, dil_h, padded_h, TILE_H)
    group_w, first_w, len_w = tile_origin(pid_tile % tiles_w, tiles_per_group_w, dil_w, padded_w, TILE_W)
    return group_h, first_h, len_h, group_w, first_w, len_w


@triton.jit
def span_slots(
    block_start, start_h, start_w, span_h, span_w, group_h, group_w, dil_h, dil_w, H, W, BLOCK: tl.constexpr
):  # fmt: skip
    """Slots ``block_start .. block_start + BLOCK - 1`` of the ``span_h x span_w`` block of group positions starting
    at ``(start_h, start_w)`` (row-major): ``(pos_h, pos_w, row, col, ok)``, group and map positions and whether the
    slot is in the span and in the map. A tile is the span ``TILE_H x TILE_W`` at its first positions."""
    offs = block_start + tl.arange(0, BLOCK)
    pos_h = start_h + offs // span_w
    pos_w = start_w + offs % span_w
    row = pos_h * dil_h + group_h
    col = pos_w * dil_w + group_w
    ok = (offs < span_h * span_w) & (row < H) & (col < W)
    return pos_h, pos_w, row, col, ok


@triton.jit
def query_tile(
    pid_tile, tiles_w, tiles_per_group_h, tiles_per_group_w, dil_h, dil_w, padded_h, padded_w, H, W,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr,
):  # fmt: skip
    """The query tile of program ``pid_tile`` (forward and query-gradient kernels): ``(group_h, group_w, key span
    start_h, span_h, start_w, span_w, query pos_h, pos_w, row, col, in map, window start_h, start_w)``."""
    group_h, first_h, len_h, group_w, first_w, len_w = program_tile(
        pid_tile, tiles_w, tiles_per_group_h, tiles_per_group_w, dil_h, dil_w, padded_h, padded_w, TILE_H, TILE_W
    )
    span_start_h, span_h = key_span(first_h, len_h, TILE_H, KERNEL_H)
    span_start_w, span_w = key_span(first_w, len_w, TILE_W, KERNEL_W)
    qpos_h, qpos_w, qrow, qcol, q_ok = span_slots(
        0, first_h, first_w, TILE_H, TILE_W, group_h, group_w, dil_h, dil_w, H, W, TILE_H * TILE_W
    )
    qstart_h = window_start(qpos_h, len_h, KERNEL_H)
    qstart_w = window_start(qpos_w, len_w, KERNEL_W)
    return (
        group_h, group_w, span_start_h, span_h, span_start_w, span_w,
        qpos_h, qpos_w, qrow, qcol, q_ok, qstart_h, qstart_w,
    )  # fmt: skip


@triton.jit
def in_windows(qstart_h, qstart_w, kpos_h, kpos_w, KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr):
    """Whether the keys at group positions ``(kpos_h, kpos_w)`` lie in the windows starting at ``(qstart_h,
    qstart_w)`` (elementwise, broadcasting)."""
    return window_contains(qstart_h, kpos_h, KERNEL_H) & window_contains(qstart_w, kpos_w, KERNEL_W)


@triton.jit
def relative_bias(
    RPB, n, sr_n, sr_h, sr_w, qpos_h, qpos_w, kpos_h, kpos_w, mask,
    KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr,
):  # fmt: skip
    """``(bias fp32, rel_h, rel_w)``: the RPB of head ``n`` between queries and keys at (broadcast) group positions,
    and its table cell; 0 where ``mask`` is off."""
    rel_h = kpos_h - qpos_h + KERNEL_H - 1
    rel_w = kpos_w - qpos_w + KERNEL_W - 1
    bias = tl.load(RPB + n * sr_n + rel_h * sr_h + rel_w * sr_w, mask=mask, other=0.0)
    return bias.to(tl.float32), rel_h, rel_w


@triton.jit
def key_block(
    K, V, b, n, block_start, span_start_h, span_start_w, span_h, span_w, group_h, group_w, dil_h, dil_w, H, W,
    offs_d, d_ok, qstart_h, qstart_w,
    sk_b, sk_h, sk_w, sk_n, sk_d, sv_b, sv_h, sv_w, sv_n, sv_d,
    BLOCK_K: tl.constexpr, KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr,
):  # fmt: skip
    """The next ``BLOCK_K`` keys of a query tile's key span (forward and query-gradient kernels): ``(kpos_h, kpos_w,
    k, v, k_ok, inside)`` with ``inside`` ``(queries, keys)``: the key is real and in the query's window."""
    kpos_h, kpos_w, krow, kcol, k_ok = span_slots(
        block_start, span_start_h, span_start_w, span_h, span_w, group_h, group_w, dil_h, dil_w, H, W, BLOCK_K
    )
    kv_mask = k_ok[:, None] & d_ok[None, :]
    k = map_load(K, b, n, krow, kcol, offs_d, sk_b, sk_n, sk_h, sk_w, sk_d, kv_mask)
    v = map_load(V, b, n, krow, kcol, offs_d, sv_b, sv_n, sv_h, sv_w, sv_d, kv_mask)
    inside = in_windows(qstart_h[:, None], qstart_w[:, None], kpos_h[None, :], kpos_w[None, :], KERNEL_H, KERNEL_W)
    return kpos_h, kpos_w, k, v, k_ok, inside & k_ok[None, :]
