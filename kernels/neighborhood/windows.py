"""Neighborhood window arithmetic along one axis, tiled for batched attention.

Along an axis of length ``L`` with kernel ``k`` and dilation ``d`` (NATTEN semantics), query ``i`` belongs to dilation
group ``g = i mod d`` at group position ``i' = i div d``; its group has ``L_g = ceil((L - g) / d)`` positions and the
query sees the ``k`` group positions ``start' .. start' + k - 1`` with ``start' = clamp(i' - k // 2, 0, L_g - k)``
(even ``k``: ``k / 2`` before the query, ``k / 2 - 1`` after it), i.e. the positions ``(start' + t) * d + g``.
An axis shorter than ``k * d`` is treated as padded to ``k * d`` at its end: windows are computed on the padded length
and the padded positions are never valid keys.

:func:`axis_tiles` cuts every group into tiles of at most ``tile`` consecutive queries (evened out over the
group). The union of the windows of a tile is at most ``tile + k - 1`` consecutive group positions (window starts
grow by at most one per query), so every tile attends to one short key span; per (query, span position) a validity
flag and the relative-position index ``key' - query' + k - 1`` (into an RPB table of ``2k - 1`` entries) describe
the neighborhood exactly.
:func:`tile_geometry` combines two axes into the gather indices and the RPB index of 2-D tiles.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class AxisTiles(NamedTuple):
    """Tiling of one axis: ``T`` tiles of ``tile`` query slots, each with a span of ``span`` key slots.

    Attributes:
        query_index: ``(T, tile)`` axis position of each query slot (clamped into range for slots past the end).
        key_index: ``(T, span)`` axis position of each key slot (clamped into range; invalid slots are masked).
        valid: ``(T, tile, span)`` whether the key slot is in the query slot's window and is a real position. Query
            slots past the end of the axis (their outputs are discarded) see only key slot 0, so no row is empty.
        rel: ``(T, tile, span)`` relative-position index ``key' - query' + k - 1`` in ``[0, 2k - 2]``.
        inverse: ``(L,)`` flat slot ``tile_id * tile + slot`` holding each axis position's query.
    """

    query_index: torch.Tensor
    key_index: torch.Tensor
    valid: torch.Tensor
    rel: torch.Tensor
    inverse: torch.Tensor


def window_start(pos: torch.Tensor, group_len: torch.Tensor, kernel: int) -> torch.Tensor:
    """``start' = clamp(i' - k // 2, 0, L_g - k)`` for group positions ``pos`` in groups of length ``group_len``."""
    return torch.minimum((pos - kernel // 2).clamp(min=0), group_len - kernel)


def axis_tiles(length: int, kernel: int, dilation: int, tile: int, device: torch.device | None = None) -> AxisTiles:
    """Tile the queries of an axis of ``length`` positions into groups of ``tile`` (see the module docstring)."""
    padded = max(length, kernel * dilation)
    per_group = -(-length // dilation)  # real queries in group 0, the largest group
    tiles_per_group = -(-per_group // max(1, min(tile, per_group)))
    tile = -(-per_group // tiles_per_group)  # balanced: no nearly empty last tile
    span = min(tile + kernel - 1, -(-padded // dilation))

    group = torch.arange(dilation, device=device).view(dilation, 1, 1)  # (d, 1, 1)
    group_len = (padded - group + dilation - 1) // dilation  # L_g of the padded axis
    first = (torch.arange(tiles_per_group, device=device) * tile).view(1, tiles_per_group, 1)  # first i' of each tile
    span_start = window_start(first, group_len, kernel)  # (d, T, 1)

    query_pos = first + torch.arange(tile, device=device)  # (1, T, tile) group positions i'
    query_start = window_start(query_pos, group_len, kernel)  # (d, T, tile)
    query_abs = query_pos * dilation + group  # (d, T, tile)
    key_pos = span_start + torch.arange(span, device=device)  # (d, T, span)
    key_abs = key_pos * dilation + group

    offset = key_pos.unsqueeze(-2) - query_start.unsqueeze(-1)  # (d, T, tile, span): place in the query's window
    valid = (offset >= 0) & (offset < kernel) & (key_abs < length).unsqueeze(-2)
    first_slot = torch.arange(span, device=device) == 0
    valid = valid | ((query_abs >= length).unsqueeze(-1) & first_slot)
    rel = (key_pos.unsqueeze(-2) - query_pos.unsqueeze(-1) + kernel - 1).clamp(0, 2 * kernel - 2)

    positions = torch.arange(length, device=device)
    pos_in_group = positions // dilation
    inverse = ((positions % dilation) * tiles_per_group + pos_in_group // tile) * tile + pos_in_group % tile
    num_tiles = dilation * tiles_per_group
    return AxisTiles(
        query_index=query_abs.clamp(max=length - 1).reshape(num_tiles, tile),
        key_index=key_abs.clamp(max=length - 1).reshape(num_tiles, span),
        valid=valid.reshape(num_tiles, tile, span),
        rel=rel.reshape(num_tiles, tile, span),
        inverse=inverse,
    )


class TileGeometry(NamedTuple):
    """Gather indices of a 2-D tiling (``Tr x Tc`` tiles of ``tr x tc`` queries and ``sr x sc`` keys).

    Attributes:
        query_rows, query_cols: ``(Tr, 1, tr, 1)`` and ``(1, Tc, 1, tc)``: ``x[:, :, query_rows, query_cols]`` of a
            ``(B, heads, H, W, D)`` map gives the query tiles ``(B, heads, Tr, Tc, tr, tc, D)``.
        key_rows, key_cols: ``(Tr, 1, sr, 1)`` and ``(1, Tc, 1, sc)``, likewise for the key tiles.
        bias_index: ``(Tr * Tc, tr * tc, sr * sc)`` flat RPB cell ``rel_row * (2 * k1 - 1) + rel_col`` of every
            (query, key) pair, or ``(2 * k0 - 1) * (2 * k1 - 1)`` (one past the table) where the key is not in the
            query's neighborhood.
        inverse: ``(H, 1)``, ``(1, W)``, ``(H, 1)``, ``(1, W)`` row tile, column tile, row slot and column slot of
            every map position: ``out[:, :, *inverse]`` maps ``(B, heads, Tr, Tc, tr, tc, D)`` back to
            ``(B, heads, H, W, D)``.
    """

    query_rows: torch.Tensor
    query_cols: torch.Tensor
    key_rows: torch.Tensor
    key_cols: torch.Tensor
    bias_index: torch.Tensor
    inverse: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def tile_geometry(
    height: int,
    width: int,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    tile: tuple[int, int],
    device: torch.device | None = None,
) -> TileGeometry:
    """The 2-D tiling of a ``height x width`` map: the product of the row and column tilings of :func:`axis_tiles`."""
    rows = axis_tiles(height, kernel_size[0], dilation[0], tile[0], device)
    cols = axis_tiles(width, kernel_size[1], dilation[1], tile[1], device)
    num_r, tile_r, span_r = rows.valid.shape
    num_c, tile_c, span_c = cols.valid.shape
    valid = rows.valid[:, None, :, None, :, None] & cols.valid[None, :, None, :, None, :]
    index = rows.rel[:, None, :, None, :, None] * (2 * kernel_size[1] - 1) + cols.rel[None, :, None, :, None, :]
    table = (2 * kernel_size[0] - 1) * (2 * kernel_size[1] - 1)
    index = index.masked_fill(~valid, table).reshape(num_r * num_c, tile_r * tile_c, span_r * span_c)
    return TileGeometry(
        query_rows=rows.query_index[:, None, :, None],
        query_cols=cols.query_index[None, :, None, :],
        key_rows=rows.key_index[:, None, :, None],
        key_cols=cols.key_index[None, :, None, :],
        bias_index=index,
        inverse=(
            (rows.inverse // tile_r)[:, None],
            (cols.inverse // tile_c)[None, :],
            (rows.inverse % tile_r)[:, None],
            (cols.inverse % tile_c)[None, :],
        ),
    )
