"""Pure-PyTorch 2-D neighborhood attention: differentiable, memory-aware, the oracle of the Triton kernels.

Queries are cut into tiles of ``tile_h x tile_w`` queries of one dilation group (:mod:`.windows`); the union of the
windows of a tile is a ``span_h x span_w`` block of keys (at most ``tile + k - 1`` per axis). Each tile attends
densely to its key block with an additive bias that holds the RPB inside every query's window and ``-inf`` outside
it (one gather from the RPB table extended by a ``-inf`` cell), so a batched matmul per tile replaces a per-query
gather. Without autograd the tiles go through ``F.scaled_dot_product_attention`` (fused, no logits materialised);
when autograd records, through an explicit softmax (faster on CPU than SDPA's unfused fallback for a differentiable
mask; it keeps the tile probabilities for the backward). Memory is ``O(B * heads * H * W * span_h * span_w)`` for the
probabilities (about ``(span / tile)^2`` times the ``k0 * k1`` exact neighborhoods, 3.4x for ``k = tile = 7``) plus
``(span / tile)^2`` copies of K and V, never ``(H * W)^2``; autograd differentiates ``q, k, v`` and the RPB table.
The tiling indices depend only on the sizes and are cached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..nonfinite import may_hold_nonfinite
from .windows import TileGeometry, tile_geometry

_GEOMETRY_CACHE: dict[tuple, TileGeometry] = {}
_GEOMETRY_CACHE_SIZE = 64


def _geometry(
    height: int,
    width: int,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    tile: tuple[int, int],
    device: torch.device,
) -> TileGeometry:
    """The tiling indices, cached by eager calls. ``torch.compile`` reads a cached entry as constants (much less to
    trace) and traces the computation into its graph otherwise."""
    key = (height, width, kernel_size, dilation, tile, str(device))
    cached = _GEOMETRY_CACHE.get(key)
    if cached is not None:
        return cached
    if torch.compiler.is_compiling():
        return tile_geometry(height, width, kernel_size, dilation, tile, device)
    if len(_GEOMETRY_CACHE) >= _GEOMETRY_CACHE_SIZE:
        _GEOMETRY_CACHE.pop(next(iter(_GEOMETRY_CACHE)))
    with torch.inference_mode(False):  # cached tensors must stay usable outside inference mode
        geo = tile_geometry(height, width, kernel_size, dilation, tile, device)
    _GEOMETRY_CACHE[key] = geo
    return geo


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, W, heads, D)`` -> contiguous ``(B, heads, H * W, D)``."""
    B, H, W, heads, D = x.shape
    return x.permute(0, 3, 1, 2, 4).reshape(B, heads, H * W, D)


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _poisoned(q_tiles: torch.Tensor, k_tiles: torch.Tensor, v_tiles: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(B, heads * tiles, queries, D)`` bool: the outputs the non-finite inputs reach. A non-finite query entry
    reaches its whole output row, a non-finite key entry the whole rows of the queries whose neighborhood holds the
    key, a non-finite value entry ``v[j, d]`` the entries ``out[i, d]`` of those queries. ``valid``: ``(tiles,
    queries, keys)`` neighborhood membership."""
    B, heads_tiles, keys, D = v_tiles.shape
    tiles = valid.shape[0]
    bad = torch.cat((~torch.isfinite(v_tiles), ~torch.isfinite(k_tiles).all(-1, keepdim=True)), -1)
    # (B, heads, tiles, queries, keys) @ (B, heads, tiles, keys, D + 1): counts of non-finite neighbors, in fp32
    reach = valid.float() @ bad.float().view(B, heads_tiles // tiles, tiles, keys, D + 1)
    reach = reach.view(B, heads_tiles, -1, D + 1) > 0
    return reach[..., :D] | reach[..., D:] | ~torch.isfinite(q_tiles).all(-1, keepdim=True)


def na2d_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    rpb: torch.Tensor | None,
    scale: float,
    tile: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Neighborhood attention of ``q, k, v: (B, H, W, heads, D)`` -> ``(B, H, W, heads, D)`` (arguments validated
    by :func:`attnzoo.kernels.neighborhood.na2d`). ``tile`` (most queries per tile and axis, default the kernel size
    clamped to 4..8) only trades memory for matmul size; the result does not depend on it. TorchScript-compatible."""
    B, H, W, heads, D = q.shape
    tile_hw = (min(max(kernel_size[0], 4), 8), min(max(kernel_size[1], 4), 8)) if tile is None else tile
    if torch.jit.is_scripting():
        geo = tile_geometry(H, W, kernel_size, dilation, tile_hw, q.device)
    else:
        geo = _geometry(H, W, kernel_size, dilation, tile_hw, q.device)
    num_r, tile_r = geo.query_rows.shape[0], geo.query_rows.shape[2]
    num_c, tile_c = geo.query_cols.shape[1], geo.query_cols.shape[3]
    tiles, queries = num_r * num_c, tile_r * tile_c
    keys = geo.key_rows.shape[2] * geo.key_cols.shape[3]

    # (B, heads, H * W, D) maps gathered into tiles (B, heads * tiles, queries or keys, D) with index_select, whose
    # backward (index_add) is much faster than that of advanced indexing (index_put with accumulation)
    query_index = (geo.query_rows * W + geo.query_cols).flatten()
    key_index = (geo.key_rows * W + geo.key_cols).flatten()
    q_tiles = _heads_first(q).index_select(2, query_index).view(B, heads * tiles, queries, D)
    k_tiles = _heads_first(k).index_select(2, key_index).view(B, heads * tiles, keys, D)
    v_tiles = _heads_first(v).index_select(2, key_index).view(B, heads * tiles, keys, D)
    # a key tile is shared by every query of its tile: a non-finite key or value would reach all of them through the
    # matmuls (0 * nan = nan), so non-finite entries are zeroed here and set back as NaN in their true neighbors only
    nonfinite = may_hold_nonfinite([q, k, v])
    q_tiles_raw, k_tiles_raw, v_tiles_raw = q_tiles, k_tiles, v_tiles
    if nonfinite:
        q_tiles, k_tiles, v_tiles = (_finite_or_zero(t) for t in (q_tiles, k_tiles, v_tiles))

    cells = (2 * kernel_size[0] - 1) * (2 * kernel_size[1] - 1)
    if rpb is None:
        table = torch.zeros((1, cells), dtype=q.dtype, device=q.device).expand(heads, cells)
    else:
        table = rpb.reshape(heads, cells).to(q.dtype)
    table = F.pad(table, (0, 1), value=float("-inf")).flatten()  # (heads * (cells + 1)), each head's last cell -inf
    head_offsets = torch.arange(heads, device=q.device).unsqueeze(1) * (cells + 1)
    bias = table.index_select(0, (geo.bias_index.view(1, -1) + head_offsets).flatten())  # (heads * tiles * ...)

    bias = bias.view(1, heads * tiles, queries, keys)  # broadcast over the batch
    records_grad = torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad or (rpb is not None and rpb.requires_grad)
    )
    if records_grad:
        # SDPA cannot differentiate a float mask in its fused CPU kernel and falls back to a slower unfused path
        logits = (q_tiles * scale) @ k_tiles.transpose(-1, -2) + bias
        if q.dtype == torch.float16 or q.dtype == torch.bfloat16:
            attn = torch.softmax(logits.float(), dim=-1).to(v.dtype)
        else:
            attn = torch.softmax(logits, dim=-1)
        out = attn @ v_tiles
    else:
        out = F.scaled_dot_product_attention(q_tiles, k_tiles, v_tiles, attn_mask=bias, scale=scale)
    if nonfinite:
        out = out.masked_fill(_poisoned(q_tiles_raw, k_tiles_raw, v_tiles_raw, geo.bias_index != cells), float("nan"))
    rows_tile, cols_tile, rows_slot, cols_slot = geo.inverse
    inverse = (((rows_tile * num_c + cols_tile) * tile_r + rows_slot) * tile_c + cols_slot).flatten()
    out = out.view(B, heads, tiles * queries, D).index_select(2, inverse)
    return out.view(B, heads, H, W, D).permute(0, 2, 3, 1, 4)  # (B, H, W, heads, D)
