"""Pure-PyTorch 2-D neighborhood attention as tiled dense products: the CPU path, the traced path (``torch.export``,
ONNX, TorchScript) and the oracle of the Triton kernels.

Queries are cut into tiles of ``tile_h x tile_w`` queries of one dilation group (:mod:`.windows`, the tile from
:func:`attnzoo.kernels.tiling.na2d_tile`; dilation makes strided sub-grids, each tiled on its own); every tile attends
densely to the one halo of ``span_h x span_w`` keys that holds all its windows (``tile + k - 1`` per axis away from the
borders; border windows shift as NATTEN's): a batched ``q k^T`` product per tile, an additive bias that holds the RPB
inside every query's window and ``-inf`` outside it, a softmax over the halo and a batched ``p v`` product. The RPB
cell of a (query slot, key slot) pair is the same in every tile and the 2-D window mask is the product of two axis
masks, so the bias is two broadcast terms (RPB + row mask, column mask) built from small tables. Inference runs the
tiles through the fused ``F.scaled_dot_product_attention`` (no logits materialised); when autograd records, through
explicit ``bmm`` / softmax / ``bmm`` products that autograd differentiates (``q, k, v`` and the RPB table). Memory is
``O(B * heads * H * W * span_h * span_w)`` for the bias and the logits of a training step (``span_h * span_w / (k0 *
k1)`` times the exact neighborhoods, 2.9x for ``k = 7`` and 4 x 8 tiles) plus ``span_h * span_w / (tile_h * tile_w)``
copies of K and V (4.4x), never ``(H * W)^2``; a dilation group of at most ``2k`` queries per axis is a single tile.

Gradients: :func:`na2d_reference` is differentiable by autograd (eager training and the traced path);
:func:`na2d_reference_forward` / :func:`na2d_reference_backward` are the forward (output and log-sum-exp) and the
hand-written backward of the custom op (:mod:`.ops`) that ``torch.compile`` traces instead: the backward recomputes
the tile probabilities from the log-sum-exp, ``dS = P * (dP - rowsum(dO * O))``, and scatters the halo gradients of K
and V back with ``index_add``.

Non-finite inputs stay local: a key or value tile is shared by every query of its tile, so non-finite entries are
zeroed before the products and the outputs they truly reach (the queries whose windows hold them, found with window
sums over prefix sums of the non-finite flags) are set to NaN afterwards.
"""

from __future__ import annotations

import torch

from ..nonfinite import may_hold_nonfinite
from ..tiling import na2d_tile
from .windows import AxisTiling, TileGeometry, tile_geometry

_GEOMETRY_CACHE: dict[tuple, TileGeometry] = {}
_GEOMETRY_CACHE_SIZE = 64


def _default_tile(
    height: int, width: int, kernel_size: tuple[int, int], dilation: tuple[int, int], dtype: torch.dtype
) -> tuple[int, int]:
    groups = ((height + dilation[0] - 1) // dilation[0], (width + dilation[1] - 1) // dilation[1])
    return na2d_tile(kernel_size, dtype, "reference", groups)


def _geometry(
    height: int,
    width: int,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    tile: tuple[int, int],
    device: torch.device,
) -> TileGeometry:
    """The tiling indices, cached by eager calls (``torch.compile`` and ``torch.export`` trace them to constants)."""
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
    """``(B, H, W, heads, C)`` -> contiguous ``(B * heads, H * W, C)``."""
    B, H, W, heads, C = x.shape
    return x.permute(0, 3, 1, 2, 4).reshape(B * heads, H * W, C)


def _tiles(x: torch.Tensor, index: torch.Tensor, slots: int) -> torch.Tensor:
    """Rows of a heads-first ``(B * heads, H * W, C)`` map at the flat positions ``index``: ``(B * heads * tiles,
    slots, C)``."""
    return x.index_select(1, index).view(-1, slots, x.shape[-1])


def _untile(x: torch.Tensor, inverse: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """Tile rows ``(B * heads * tiles, slots, D)`` back to a contiguous ``(B, H, W, heads, D)`` map (each position
    reads its own query slot)."""
    B, H, W, heads, D = shape
    out = x.view(B * heads, -1, D).index_select(1, inverse)
    return out.view(B, heads, H, W, D).permute(0, 2, 3, 1, 4).contiguous()


def _untile_stats(x: torch.Tensor, inverse: torch.Tensor, B: int, heads: int, H: int, W: int) -> torch.Tensor:
    """Per-query tile statistics ``(B * heads * tiles, slots, 1)`` back to ``(B, heads, H, W)``."""
    return x.view(B * heads, -1).index_select(1, inverse).view(B, heads, H, W)


def _tile_stats(x: torch.Tensor, index: torch.Tensor, slots: int) -> torch.Tensor:
    """Per-query statistics ``(B * heads, H * W (+ 1))`` at the query slots ``index``: ``(B * heads * tiles, slots,
    1)``."""
    return x.index_select(1, index).view(-1, slots, 1)


def _bias_terms(
    geo: TileGeometry, rpb: torch.Tensor | None, heads: int, kernel_size: tuple[int, int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two terms whose broadcast sum over logits ``(B, heads, Tr, Tc, tr, tc, sr, sc)`` is the bias of every tile:
    ``(heads or 1, Tr, 1, tr, tc or 1, sr, sc or 1)`` (the RPB plus the row mask) and ``(Tc, 1, tc, sr, sc)`` (the
    column mask, repeated over the key rows so that the broadcast adds contiguous blocks)."""
    tile_r, span_r = geo.rows.valid.shape[1], geo.rows.valid.shape[2]
    tile_c, span_c = geo.cols.valid.shape[1], geo.cols.valid.shape[2]
    row_term = geo.row_mask.to(dtype)
    if rpb is not None:
        cells = (2 * kernel_size[0] - 1) * (2 * kernel_size[1] - 1)
        table = rpb.reshape(heads, cells).to(dtype).index_select(1, geo.rel_index)
        row_term = table.view(heads, 1, 1, tile_r, tile_c, span_r, span_c) + row_term
    return row_term, geo.col_mask.to(dtype)


def _attention_mask(
    geo: TileGeometry, rpb: torch.Tensor | None, heads: int, kernel_size: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """The whole additive bias ``(heads or 1, Tr * Tc * tr * tc * sr * sc)`` (RPB and window masks) of every tile."""
    if rpb is not None and geo.cell_index.numel() > 0:  # one tile: one gather from the extended table
        cells = (2 * kernel_size[0] - 1) * (2 * kernel_size[1] - 1)
        table = torch.nn.functional.pad(rpb.reshape(heads, cells).to(dtype), (0, 1), value=float("-inf"))
        return table.index_select(1, geo.cell_index)
    row_term, col_term = _bias_terms(geo, rpb, heads, kernel_size, dtype)
    return (row_term + col_term).flatten(1)


def _band_floats() -> int:
    """Inference gathers the K / V halos of this many floats at most at a time (whole rows of tiles, at least one):
    the temporaries of a band stay in the CPU's caches and its allocator reuses them."""
    return 1 << 18


def _fused(
    q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor, batch: int, queries: int, keys: int, scale: float
) -> torch.Tensor:
    """Fused attention of query tiles ``(B * heads, tiles * queries, D)`` against their halos ``(B * heads, tiles *
    keys, 2D)`` (keys, then values) with the bias ``mask`` ``(heads or 1, tiles * queries * keys)``; ``batch``: ``B``
    with an RPB (heads join the tiles), else ``B * heads``. Returns ``(B * heads, tiles * queries, D)``."""
    D = q.shape[-1]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.view(batch, -1, queries, D),
        kv[:, :, :D].view(batch, -1, keys, D),
        kv[:, :, D:].view(batch, -1, keys, D),
        attn_mask=mask.view(1, -1, queries, keys),
        scale=scale,
    )
    return out.view(q.shape)


def _fused_in_bands(
    q_hf: torch.Tensor,
    kv_hf: torch.Tensor,
    geo: TileGeometry,
    rpb: torch.Tensor | None,
    B: int,
    heads: int,
    kernel_size: tuple[int, int],
    scale: float,
) -> torch.Tensor:
    """Inference over bands of whole tile rows (at most :func:`_band_floats` of halos each): gather, bias, fused
    attention. Returns the query tiles' outputs ``(B * heads, tiles * queries, D)``."""
    num_r, tile_r, span_r = geo.rows.valid.shape
    num_c, tile_c, span_c = geo.cols.valid.shape
    queries, keys = tile_r * tile_c, span_r * span_c
    row_term, col_term = _bias_terms(geo, rpb, heads, kernel_size, q_hf.dtype)
    # bands of one image's size while traced: a band count that depends on a symbolic batch would guard on it
    images = 1 if torch.compiler.is_compiling() else B
    per_row = images * heads * num_c * keys * kv_hf.shape[-1]
    band = max(1, _band_floats() // max(1, per_row))
    outs: list[torch.Tensor] = []
    for first in range(0, num_r, band):
        last = min(num_r, first + band)
        q_tiles = _tiles(q_hf, geo.query_index[first * num_c * queries : last * num_c * queries], queries)
        kv_tiles = _tiles(kv_hf, geo.key_index[first * num_c * keys : last * num_c * keys], keys)
        mask = (row_term[:, first:last] + col_term).flatten(1)
        batch = B if rpb is not None else B * heads
        q_band = q_tiles.view(B * heads, -1, q_hf.shape[-1])
        kv_band = kv_tiles.view(B * heads, -1, kv_hf.shape[-1])
        outs.append(_fused(q_band, kv_band, mask, batch, queries, keys, scale))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 1)


def _logits(
    q_tiles: torch.Tensor,
    k_tiles: torch.Tensor,
    geo: TileGeometry,
    rpb: torch.Tensor | None,
    batch: int,
    heads: int,
    kernel_size: tuple[int, int],
) -> torch.Tensor:
    """``(B * heads * tiles, queries, keys)`` biased logits of scaled query tiles against their halos, in at least
    float32."""
    num_r, tile_r, span_r = geo.rows.valid.shape
    num_c, tile_c, span_c = geo.cols.valid.shape
    logits = torch.bmm(q_tiles, k_tiles.transpose(1, 2))
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    row_term, col_term = _bias_terms(geo, rpb, heads, kernel_size, logits.dtype)
    grid = logits.view(batch, heads, num_r, num_c, tile_r, tile_c, span_r, span_c) + row_term  # a new tensor:
    return grid.add_(col_term).view(logits.shape)  # autograd sees no in-place op on a view


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _window_sums(x: torch.Tensor, dim: int, axis: AxisTiling, dilation: int) -> torch.Tensor:
    """Sums of ``x`` over the real keys of every position's window along ``dim`` (1 or 2 of a ``(B, H, W, C)``
    tensor), from prefix sums per dilation group."""
    length = x.shape[dim]
    per_group = (length + dilation - 1) // dilation
    pad = [0, 0, 0, 0, 0, 0]
    pad[2 * (3 - dim) + 1] = per_group * dilation - length
    x = torch.nn.functional.pad(x, pad)
    shape = list(x.shape)
    grouped = shape[:dim] + [per_group, dilation] + shape[dim + 1 :]
    prefix = x.reshape(grouped).cumsum(dim)
    zero_row = [0, 0] * (4 - dim) + [1, 0]  # one leading row of zeros along the group position
    prefix = torch.nn.functional.pad(prefix, zero_row).flatten(dim, dim + 1)
    return prefix.index_select(dim, axis.window_last) - prefix.index_select(dim, axis.window_first)


def _nonfinite_reach(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, geo: TileGeometry, dilation: tuple[int, int]
) -> torch.Tensor:
    """``(B, H, W, heads, D)`` bool, the outputs the non-finite inputs reach: a query's whole row, a key's the rows
    of the queries whose neighborhood holds it, a value entry ``v[j, d]`` entry ``d`` of those rows."""
    B, H, W, heads, D = v.shape
    flags = torch.cat((~torch.isfinite(v), ~torch.isfinite(k).all(-1, keepdim=True)), -1).float()
    counts = _window_sums(flags.view(B, H, W, heads * (D + 1)), 1, geo.rows, dilation[0])
    counts = _window_sums(counts, 2, geo.cols, dilation[1]).view(B, H, W, heads, D + 1)
    reach = counts > 0
    return reach[..., :D] | reach[..., D:] | ~torch.isfinite(q).all(-1, keepdim=True)


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    rpb: torch.Tensor | None,
    scale: float,
    tile: tuple[int, int] | None,
    with_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    B, H, W, heads, D = q.shape
    tile_hw = _default_tile(H, W, kernel_size, dilation, q.dtype) if tile is None else tile
    if torch.jit.is_scripting():
        geo = tile_geometry(H, W, kernel_size, dilation, tile_hw, q.device)
    else:
        geo = _geometry(H, W, kernel_size, dilation, tile_hw, q.device)
    queries = geo.rows.valid.shape[1] * geo.cols.valid.shape[1]
    keys = geo.rows.valid.shape[2] * geo.cols.valid.shape[2]
    identity = geo.rows.identity and geo.cols.identity  # one tile, the map itself: nothing to gather
    lse: torch.Tensor | None = None
    records_grad = torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad or (rpb is not None and rpb.requires_grad)
    )
    # heads-first contiguous copies (the finiteness check reads them fast); K and V side by side for inference (one
    # gather serves both), apart when autograd records (slicing them apart would cost full-size slice gradients)
    q_hf = _heads_first(q)
    if with_lse or records_grad:
        k_hf, v_hf = _heads_first(k), _heads_first(v)
        nonfinite = may_hold_nonfinite([q_hf, k_hf, v_hf])
        if nonfinite:
            q_hf, k_hf, v_hf = _finite_or_zero(q_hf), _finite_or_zero(k_hf), _finite_or_zero(v_hf)
        q_tiles = q_hf if identity else _tiles(q_hf, geo.query_index, queries)
        k_tiles = k_hf if identity else _tiles(k_hf, geo.key_index, keys)
        logits = _logits(q_tiles * scale, k_tiles, geo, rpb, B, heads, kernel_size)
        if with_lse:
            lse_tiles = torch.logsumexp(logits, -1, keepdim=True)
            probs = logits.sub_(lse_tiles).exp_()
            lse = lse_tiles.view(B, heads, H, W) if identity else _untile_stats(lse_tiles, geo.inverse, B, heads, H, W)
        else:
            probs = torch.softmax(logits, -1)
        out = torch.bmm(probs.to(v.dtype), v_hf if identity else _tiles(v_hf, geo.key_index, keys))
    else:
        kv_hf = torch.cat((k.permute(0, 3, 1, 2, 4), v.permute(0, 3, 1, 2, 4)), -1).reshape(B * heads, H * W, 2 * D)
        nonfinite = may_hold_nonfinite([q_hf, kv_hf])
        if nonfinite:
            q_hf, kv_hf = _finite_or_zero(q_hf), _finite_or_zero(kv_hf)
        if identity:
            mask = _attention_mask(geo, rpb, heads, kernel_size, q.dtype)
            out = _fused(q_hf, kv_hf, mask, B if rpb is not None else B * heads, queries, keys, scale)
        else:
            out = _fused_in_bands(q_hf, kv_hf, geo, rpb, B, heads, kernel_size, scale)
    if identity:
        out = out.reshape(B, heads, H, W, D).permute(0, 2, 3, 1, 4).contiguous()
    else:
        out = _untile(out, geo.inverse, [B, H, W, heads, D])
    if nonfinite:
        out = out.masked_fill(_nonfinite_reach(q, k, v, geo, dilation), float("nan"))
    return out, lse


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
    """Neighborhood attention of ``q, k, v: (B, H, W, heads, D)`` -> contiguous ``(B, H, W, heads, D)`` (arguments
    validated by :func:`attnzoo.kernels.neighborhood.na2d`), differentiable by autograd. ``tile`` (most queries per
    tile and axis, default :func:`attnzoo.kernels.tiling.na2d_tile`) only trades memory for matmul size; the result
    does not depend on it. TorchScript-compatible."""
    return _forward(q, k, v, kernel_size, dilation, rpb, scale, tile, False)[0]


def na2d_reference_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rpb: torch.Tensor | None,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, H, W, heads, D), lse (B, heads, H, W))``: the output and the natural-log log-sum-exp of every
    query's biased logits (in at least float32), the state :func:`na2d_reference_backward` needs."""
    out, lse = _forward(q, k, v, kernel_size, dilation, rpb, scale, None, True)
    assert lse is not None
    return out, lse


def na2d_reference_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rpb: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    scale: float,
    rpb_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients ``(dq, dk, dv, drpb)`` of :func:`na2d_reference_forward` (``drpb`` is None without an RPB table or
    when ``rpb_grad`` is False); ``dq, dk, dv`` contiguous ``(B, H, W, heads, D)`` in the input dtype."""
    B, H, W, heads, D = q.shape
    geo = _geometry(H, W, kernel_size, dilation, _default_tile(H, W, kernel_size, dilation, q.dtype), q.device)
    queries = geo.rows.valid.shape[1] * geo.cols.valid.shape[1]
    keys = geo.rows.valid.shape[2] * geo.cols.valid.shape[2]
    tiles = geo.rows.valid.shape[0] * geo.cols.valid.shape[0]
    q_tiles = _tiles(_heads_first(q), geo.query_index, queries) * scale
    k_tiles = _tiles(_heads_first(k), geo.key_index, keys)
    v_tiles = _tiles(_heads_first(v), geo.key_index, keys)
    do_tiles = _tiles(_heads_first(grad_out), geo.query_index, queries)
    # P = exp(S - lse); slots of no real query get lse = +inf, hence P = 0 and no gradient
    lse_flat = torch.nn.functional.pad(lse.reshape(B * heads, H * W), (0, 1), value=float("inf"))
    probs = _logits(q_tiles, k_tiles, geo, rpb, B, heads, kernel_size)
    compute = probs.dtype
    probs = probs.sub_(_tile_stats(lse_flat.to(compute), geo.query_or_sentinel, queries)).exp_()
    delta = (grad_out.to(compute) * out.to(compute)).sum(-1).permute(0, 3, 1, 2).reshape(B * heads, H * W)
    grad_probs = torch.bmm(do_tiles, v_tiles.transpose(1, 2)).to(compute)
    grad_logits = grad_probs.sub_(_tile_stats(delta, geo.query_index, queries)).mul_(probs)  # P * (dP - delta)
    drpb: torch.Tensor | None = None
    if rpb is not None and rpb_grad:
        per_slot = grad_logits.view(B, heads, tiles, queries * keys).sum((0, 2))
        cells = (2 * kernel_size[0] - 1) * (2 * kernel_size[1] - 1)
        table = torch.zeros((heads, cells), dtype=compute, device=q.device).index_add_(1, geo.rel_index, per_slot)
        drpb = table.view(rpb.shape).to(rpb.dtype)
    grad_logits = grad_logits.to(q.dtype)
    dq = _untile(torch.bmm(grad_logits, k_tiles) * scale, geo.inverse, [B, H, W, heads, D])
    dk_tiles = torch.bmm(grad_logits.transpose(1, 2), q_tiles)
    dv_tiles = torch.bmm(probs.to(v.dtype).transpose(1, 2), do_tiles)
    dk = _scatter_keys(dk_tiles, geo.key_index, [B, H, W, heads, D])
    dv = _scatter_keys(dv_tiles, geo.key_index, [B, H, W, heads, D])
    return dq, dk, dv, drpb


def _scatter_keys(x: torch.Tensor, index: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """Sum halo rows ``(B * heads * tiles, keys, D)`` into their map positions: contiguous ``(B, H, W, heads, D)``,
    accumulated in at least float32."""
    B, H, W, heads, D = shape
    acc = torch.promote_types(x.dtype, torch.float32)
    total = torch.zeros((B * heads, H * W, D), dtype=acc, device=x.device)
    total.index_add_(1, index, x.view(B * heads, -1, D).to(acc))
    return total.view(B, heads, H, W, D).permute(0, 2, 3, 1, 4).to(x.dtype, memory_format=torch.contiguous_format)
