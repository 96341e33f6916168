"""Neighborhood window arithmetic of the tiled PyTorch reference: query tiles, their key halos and the masks.

Along an axis of length ``L`` with kernel ``k`` and dilation ``d`` (NATTEN semantics), query ``i`` belongs to dilation
group ``g = i mod d`` at group position ``i' = i div d``; its group has ``L_g = ceil((L - g) / d)`` positions and the
query sees the ``k`` group positions ``start' .. start' + k - 1`` with ``start' = clamp(i' - k // 2, 0, L_g - k)``
(even ``k``: ``k / 2`` before the query, ``k / 2 - 1`` after it), i.e. the positions ``(start' + t) * d + g``.
An axis shorter than ``k * d`` is treated as padded to ``k * d`` at its end: windows are computed on the padded length
and the padded positions are never valid keys.

Dilation makes ``d`` strided sub-grids (the groups), each an undilated problem. :func:`axis_tiling` cuts every group
into tiles of at most ``tile`` consecutive queries (the same number of tiles per group, evened out) and gives every
tile the *same* halo: the ``span`` group positions ``first + offset .. first + offset + span - 1`` around its first
query ``first``, where ``offset`` and ``span`` are the smallest that hold the windows of every tile (``offset =
-k // 2`` and ``span = tile + k - 1`` away from the borders; a border shifts its windows inward and may widen the
halo). With one offset the relative position of a (query slot, key slot) pair, hence its RPB cell, is the same in
every tile; only the validity (the key is in the query's window and is a real position) differs, and only in border
tiles.
:func:`tile_geometry` combines two axes into the flat gather indices of 2-D tiles; a 2-D neighborhood is the product of
its axes, so the 2-D validity is the product of the axes' validities.

Everything here depends on the sizes only; all functions are TorchScript-compatible and trace to constants.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class AxisTiling(NamedTuple):
    """Tiling of one axis: ``T = d * tiles_per_group`` tiles (group-major) of ``tile`` query slots, each with a halo of
    ``span`` key slots.

    Attributes:
        query_index: ``(T, tile)`` axis position of each query slot (clamped into range for slots past the end of
            their group: their outputs are discarded).
        query_real: ``(T, tile)`` whether the slot holds a real query.
        key_index: ``(T, span)`` axis position of each key slot (clamped into range; unreal slots are never valid).
        valid: ``(T, tile, span)`` whether the key slot is in the query slot's window and is a real position. A query
            slot past the end sees only key slot 0, so no row of a 2-D tile is empty.
        rel: ``(tile, span)`` relative-position index ``key' - query' + k - 1``, clamped to ``[0, 2k - 2]`` (exact
            where ``valid``), the same for every tile.
        inverse: ``(L,)`` flat slot ``tile_id * tile + slot`` holding each axis position's query.
        window_first, window_last: ``(L,)`` indices into the group-major prefix sums of :func:`window_sums`: the
            window of position ``i`` (its real keys) sums to ``prefix[window_last[i]] - prefix[window_first[i]]``.
        identity: one tile holds the whole axis, its queries and its halo are the axis in order (no gather needed).
    """

    query_index: torch.Tensor
    query_real: torch.Tensor
    key_index: torch.Tensor
    valid: torch.Tensor
    rel: torch.Tensor
    inverse: torch.Tensor
    window_first: torch.Tensor
    window_last: torch.Tensor
    identity: bool


def window_start(pos: torch.Tensor, group_len: torch.Tensor, kernel: int) -> torch.Tensor:
    """``start' = clamp(i' - k // 2, 0, L_g - k)`` for group positions ``pos`` in groups of length ``group_len``."""
    return torch.minimum((pos - kernel // 2).clamp(min=0), group_len - kernel)


def _halo(length: int, kernel: int, dilation: int, tile: int, tiles_per_group: int) -> tuple[int, int]:
    """``(offset, span)`` of the common halo: the union, over every tile of every group, of the windows of the tile's
    real queries, relative to the tile's first query (window starts grow monotonically with the query)."""
    padded = max(length, kernel * dilation)
    low, high = 0, 0
    for group in range(dilation):
        group_len = (padded - group + dilation - 1) // dilation
        real = (length - group + dilation - 1) // dilation
        for index in range(tiles_per_group):
            first = index * tile
            last = min(first + tile, real) - 1
            if last >= first:
                start_first = min(max(first - kernel // 2, 0), group_len - kernel)
                start_last = min(max(last - kernel // 2, 0), group_len - kernel)
                low = min(low, start_first - first)
                high = max(high, start_last + kernel - 1 - first)
    return low, high - low + 1


def axis_tiling(length: int, kernel: int, dilation: int, tile: int, device: torch.device | None = None) -> AxisTiling:
    """Tile the queries of an axis of ``length`` positions in tiles of at most ``tile`` (see the module docstring)."""
    padded = max(length, kernel * dilation)
    per_group = (length + dilation - 1) // dilation  # real queries of group 0, the largest group
    tiles_per_group = (per_group + max(1, min(tile, per_group)) - 1) // max(1, min(tile, per_group))
    tile = (per_group + tiles_per_group - 1) // tiles_per_group  # balanced: no nearly empty last tile
    offset, span = _halo(length, kernel, dilation, tile, tiles_per_group)

    group = torch.arange(dilation, device=device).view(dilation, 1, 1)  # (d, 1, 1)
    group_len = (padded - group + dilation - 1) // dilation  # L_g of the padded axis
    real_len = (length - group + dilation - 1) // dilation  # real positions of the group
    first = (torch.arange(tiles_per_group, device=device) * tile).view(1, tiles_per_group, 1)
    query_pos = first + torch.arange(tile, device=device)  # (1, T, tile) group positions i'
    query_real = (query_pos < real_len).expand(dilation, tiles_per_group, tile)
    query_start = window_start(query_pos, group_len, kernel)  # (d, T, tile)
    key_pos = first + offset + torch.arange(span, device=device)  # (1, T, span)
    key_real = (key_pos >= 0) & (key_pos < real_len)  # (d, T, span)

    inside = (key_pos.unsqueeze(-2) >= query_start.unsqueeze(-1)) & (
        key_pos.unsqueeze(-2) < query_start.unsqueeze(-1) + kernel
    )
    valid = inside & key_real.unsqueeze(-2) & query_real.unsqueeze(-1)
    first_slot = torch.arange(span, device=device) == 0
    valid = valid | (~query_real.unsqueeze(-1) & first_slot)
    slots = torch.arange(tile, device=device)
    rel = (offset + torch.arange(span, device=device).view(1, span) - slots.view(tile, 1) + kernel - 1).clamp(
        0, 2 * kernel - 2
    )

    num_tiles = dilation * tiles_per_group
    clamp_high = (real_len - 1).clamp(min=0)
    query_index = torch.minimum(query_pos, clamp_high) * dilation + group
    key_index = torch.minimum(key_pos.clamp(min=0), clamp_high) * dilation + group

    positions = torch.arange(length, device=device)
    pos_group, pos_in_group = positions % dilation, positions // dilation
    inverse = (pos_group * tiles_per_group + pos_in_group // tile) * tile + pos_in_group % tile
    # windows for the prefix sums, on the group-major layout (per_group + 1 rows of d groups, row 0 all zeros)
    pos_len = (padded - pos_group + dilation - 1) // dilation
    pos_real = (length - pos_group + dilation - 1) // dilation
    start = window_start(pos_in_group, pos_len, kernel)
    last = torch.minimum(start + kernel - 1, pos_real - 1)
    return AxisTiling(
        query_index=query_index.reshape(num_tiles, tile),
        query_real=query_real.reshape(num_tiles, tile),
        key_index=key_index.reshape(num_tiles, span),
        valid=valid.reshape(num_tiles, tile, span),
        rel=rel,
        inverse=inverse,
        window_first=start * dilation + pos_group,
        window_last=(last + 1) * dilation + pos_group,
        identity=dilation == 1 and tiles_per_group == 1 and tile == length and offset == 0 and span == length,
    )


class TileGeometry(NamedTuple):
    """Flat gather indices of a 2-D tiling (``Tr x Tc`` tiles of ``tr x tc`` queries and ``sr x sc`` keys), tiles
    row-major, slots row-major within a tile.

    Attributes:
        rows, cols: the two :class:`AxisTiling`.
        query_index: ``(Tr * Tc * tr * tc,)`` flat map position ``row * W + col`` of every query slot.
        query_or_sentinel: ``query_index`` with ``H * W`` (one past the map) at the slots of no real query.
        key_index: ``(Tr * Tc * sr * sc,)`` flat map position of every key slot.
        inverse: ``(H * W,)`` flat query slot of every map position.
        rel_index: ``(tr * tc * sr * sc,)`` flat RPB cell ``rel_row * (2 * k1 - 1) + rel_col`` of every (query slot,
            key slot) pair.
        row_mask: ``(Tr, 1, tr, 1, sr, 1)`` float32, 0 where the key row is in the query row's window (and real),
            ``-inf`` elsewhere; broadcasts over logits ``(Tr, Tc, tr, tc, sr, sc)``.
        col_mask: ``(Tc, 1, tc, sr, sc)`` float32, the same for columns, repeated over the key rows.
        cell_index: for a single tile (``Tr = Tc = 1``), ``(tr * tc * sr * sc,)`` RPB cell of every (query slot, key
            slot) pair, or ``(2 * k0 - 1) * (2 * k1 - 1)`` (one past the table) outside the query's window: the whole
            bias is one gather from the table extended by a ``-inf`` cell. Empty for several tiles.
    """

    rows: AxisTiling
    cols: AxisTiling
    query_index: torch.Tensor
    query_or_sentinel: torch.Tensor
    key_index: torch.Tensor
    inverse: torch.Tensor
    rel_index: torch.Tensor
    row_mask: torch.Tensor
    col_mask: torch.Tensor
    cell_index: torch.Tensor


def _additive_mask(valid: torch.Tensor) -> torch.Tensor:
    """0 where ``valid``, ``-inf`` elsewhere (float32)."""
    return torch.zeros(valid.shape, dtype=torch.float32, device=valid.device).masked_fill(~valid, float("-inf"))


def tile_geometry(
    height: int,
    width: int,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    tile: tuple[int, int],
    device: torch.device | None = None,
) -> TileGeometry:
    """The 2-D tiling of a ``height x width`` map: the product of the row and column tilings of :func:`axis_tiling`."""
    rows = axis_tiling(height, kernel_size[0], dilation[0], tile[0], device)
    cols = axis_tiling(width, kernel_size[1], dilation[1], tile[1], device)
    query = rows.query_index[:, None, :, None] * width + cols.query_index[None, :, None, :]
    real = rows.query_real[:, None, :, None] & cols.query_real[None, :, None, :]
    keys = rows.key_index[:, None, :, None] * width + cols.key_index[None, :, None, :]
    num_c, tile_r, tile_c = cols.query_index.shape[0], rows.query_index.shape[1], cols.query_index.shape[1]
    tile_of_row, slot_of_row = rows.inverse // tile_r, rows.inverse % tile_r
    tile_of_col, slot_of_col = cols.inverse // tile_c, cols.inverse % tile_c
    inverse = ((tile_of_row[:, None] * num_c + tile_of_col[None, :]) * tile_r + slot_of_row[:, None]) * tile_c
    inverse = inverse + slot_of_col[None, :]
    rel = rows.rel[:, None, :, None] * (2 * kernel_size[1] - 1) + cols.rel[None, :, None, :]
    num_r, span_r = rows.valid.shape[0], rows.valid.shape[2]
    span_c = cols.valid.shape[2]
    row_mask = _additive_mask(rows.valid).view(num_r, 1, tile_r, 1, span_r, 1)
    cell_index = torch.zeros(0, dtype=rel.dtype, device=rel.device)
    if num_r * num_c == 1:
        valid = rows.valid[0, :, None, :, None] & cols.valid[0, None, :, None, :]
        cell_index = rel.masked_fill(~valid, (2 * kernel_size[0] - 1) * (2 * kernel_size[1] - 1)).flatten()
    col_mask = _additive_mask(cols.valid).view(num_c, 1, tile_c, 1, span_c).expand(num_c, 1, tile_c, span_r, span_c)
    return TileGeometry(
        rows=rows,
        cols=cols,
        query_index=query.flatten(),
        query_or_sentinel=torch.where(real, query, height * width).flatten(),
        key_index=keys.flatten(),
        inverse=inverse.flatten(),
        rel_index=rel.flatten(),
        row_mask=row_mask,
        col_mask=col_mask.contiguous(),
        cell_index=cell_index,
    )
