"""Pure-PyTorch bi-level routing attention as batched products over gathered regions (oracle, CPU path, the traced
path of ``torch.export`` / ONNX, TorchScript).

Queries, keys and values are copied once into a heads-outermost region-major layout, ``(heads, B * S*S, T, D)`` (keys
and values side by side, so one gather serves both); the routed key/value regions of every query region are then
gathered in one ``index_select`` of whole regions (``topk`` region copies per query region, shared by its ``T``
queries: no per-query copies), and the token attention of all query regions runs as one batched
``F.scaled_dot_product_attention`` (fused on CPU, differentiable) with the regions as its batch.
All functions are TorchScript-compatible; argument checking lives in :mod:`attnzoo.kernels.routing.api`.

Masked padding (``bra2d(..., padding="mask")``): the tokens added to reach a multiple of ``n_win`` are excluded —
region means average only valid tokens, regions without valid tokens get affinity ``-inf``, and padded keys are left
out of every softmax — so the padded content never matters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..nonfinite import may_hold_nonfinite


def pad_map(x: torch.Tensor, n_win: int) -> torch.Tensor:
    """Zero-pad a ``(B, H, W, heads, D)`` map at the bottom/right to sides that are multiples of ``n_win``."""
    # ceil(side / n_win) * n_win - side: symbolically exact, so a map padded once is seen unpadded when traced
    pad_h, pad_w = (-(-x.shape[1] // n_win) * n_win - x.shape[1], -(-x.shape[2] // n_win) * n_win - x.shape[2])
    if not torch.compiler.is_compiling() and pad_h == 0 and pad_w == 0:  # traced: no branch on the (dynamic) size
        return x
    if x.numel() == 0:  # F.pad rejects empty inputs on torch < 2.6
        return x.new_zeros((x.shape[0], x.shape[1] + pad_h, x.shape[2] + pad_w, x.shape[3], x.shape[4]))
    return F.pad(x, [0, 0, 0, 0, 0, pad_w, 0, pad_h])


def valid_tokens(H: int, W: int, n_win: int, device: torch.device) -> torch.Tensor:
    """Which tokens of an ``H x W`` map zero-padded by :func:`pad_map` are real: ``(Hp, Wp)`` bool."""
    rows = torch.arange(-(-H // n_win) * n_win, device=device) < H
    cols = torch.arange(-(-W // n_win) * n_win, device=device) < W
    return rows[:, None] & cols[None, :]


def region_means(x: torch.Tensor, n_win: int, layout: str, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over each region's tokens, heads x channels flattened: ``(B, S*S, heads * D)``, at least float32.

    ``valid`` (``"map"`` layout only): ``(H, W)`` bool from :func:`valid_tokens`; each region then averages only its
    valid tokens (a region without any gives zeros).
    """
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if layout == "regions":
        return x.mean(2).flatten(2)
    B, H, W = x.shape[0], x.shape[1], x.shape[2]
    shape = [B, n_win, H // n_win, n_win, W // n_win, x.shape[3] * x.shape[4]]
    if valid is None:
        return x.reshape(shape).mean((2, 4)).reshape(B, n_win * n_win, shape[-1])
    sums = (x * valid[:, :, None, None]).reshape(shape).sum((2, 4)).reshape(B, n_win * n_win, shape[-1])
    counts = valid.reshape(n_win, H // n_win, n_win, W // n_win).sum((1, 3)).reshape(-1, 1)
    return sums / counts.clamp(min=1)


def route_means(
    q_regions: torch.Tensor, k_regions: torch.Tensor, topk: int, k_empty: torch.Tensor | None = None
) -> torch.Tensor:
    """Top-``topk`` key regions of every query region by affinity ``q_r k_r^T``: ``(B, S*S, topk)`` int64.

    Routing is detached (no gradient flows through it) and computed in at least float32; the positive softmax scale
    of the official affinity does not change the top-k set and is left out. ``k_empty``: ``(S*S,)`` bool, key regions
    that hold no valid token; their affinity is ``-inf``, so they are picked only when ``topk`` exceeds the number of
    other regions (and then rank last).
    """
    affinity = q_regions.detach() @ k_regions.detach().transpose(-1, -2)
    if k_empty is not None:
        affinity = affinity.masked_fill(k_empty, float("-inf"))
    return torch.topk(affinity, topk, dim=-1).indices


def _heads_outer(x: torch.Tensor) -> torch.Tensor:
    """Region-major ``(B, R, T, heads, D)`` -> contiguous ``(heads, B * R, T, D)``."""
    B, R, T, heads, D = x.shape
    return x.permute(3, 0, 1, 2, 4).reshape(heads, B * R, T, D)


def _map_heads_outer(x: torch.Tensor, n_win: int) -> torch.Tensor:
    """A ``(B, H, W, heads, D)`` map (sides multiples of ``n_win``) -> contiguous region-major ``(heads, B * S*S,
    (H/S) * (W/S), D)``."""
    B, H, W, heads, D = x.shape
    x = x.reshape(B, n_win, H // n_win, n_win, W // n_win, heads, D).permute(5, 0, 1, 3, 2, 4, 6)
    return x.reshape(heads, B * n_win * n_win, (H // n_win) * (W // n_win), D)


def _region_means_heads_outer(
    x: torch.Tensor, batch: int, regions: int, key_valid: torch.Tensor | None
) -> torch.Tensor:
    """:func:`region_means` of a heads-outer ``(heads, B * R, T, D)`` tensor: ``(B, R, heads * D)``, at least float32;
    with ``key_valid`` ``(R, T)`` the mean of each region's valid tokens (zeros without any)."""
    heads, BR, T, D = x.shape
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if key_valid is None:
        means = x.mean(2)
    else:
        weight = key_valid.to(x.dtype).repeat(batch, 1)  # (B * R, T)
        means = (x * weight[:, :, None]).sum(2) / weight.sum(1, keepdim=True).clamp(min=1)
    return means.permute(1, 0, 2).reshape(batch, regions, heads * D)


def _attend_regions(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor,
    scale: float,
    key_valid: torch.Tensor | None,
    nonfinite: bool,
) -> torch.Tensor:
    """Token attention over routed regions in the heads-outer layout: ``q, k (heads, B * R, T, D)``, ``v (heads, B *
    R, T, Dv)``, ``index (B, R, topk)``, ``key_valid`` optional ``(R, T)`` bool (keys that take part). Returns
    ``(heads, B * R, T, Dv)``; with ``nonfinite`` (the inputs may hold NaN), NaN inputs reach exactly the outputs that
    attend to them."""
    heads, BR, T, _ = q.shape
    B, R, topk = index.shape
    flat = (index + torch.arange(B, device=index.device).view(B, 1, 1) * R).flatten()
    # the gathers of whole routed regions, shared by the T queries of a region
    k_routed = k.index_select(1, flat).view(heads, BR, topk * T, k.shape[-1])
    v_routed = v.index_select(1, flat).view(heads, BR, topk * T, v.shape[-1])
    mask: torch.Tensor | None = None
    if key_valid is not None:
        mask = key_valid[index].reshape(1, BR, 1, topk * T)
    records_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if records_grad:  # explicit products: autograd's bmm / softmax backward beat the fused CPU backward here
        logits = torch.matmul(q * scale, k_routed.transpose(-1, -2))
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(logits.float(), -1).to(v.dtype) if q.dtype != torch.float64 else logits.softmax(-1)
        out = torch.matmul(probs, v_routed)
    else:
        out = F.scaled_dot_product_attention(q, k_routed, v_routed, attn_mask=mask, scale=scale)
    if nonfinite:
        out = out.masked_fill(_nan_reach(q, k, v, flat, topk), float("nan"))
    return out


def _nan_reach(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, flat_index: torch.Tensor, topk: int) -> torch.Tensor:
    """``(heads, B * R, T, Dv)`` bool, the outputs NaN inputs reach (whatever SDPA does with them): a NaN query entry
    its token's row, a NaN key entry every row of the query regions routed to its region, a NaN value entry
    ``v[..., d]`` channel ``d`` of those rows."""
    heads, BR, T, _ = q.shape
    key_nan = torch.isnan(k).any(3).any(2, keepdim=True)  # (heads, B * R, 1): per region
    value_nan = torch.isnan(v).any(2)  # (heads, B * R, Dv)
    routed = torch.cat((key_nan, value_nan), -1).index_select(1, flat_index)
    routed = routed.view(heads, BR, topk, v.shape[-1] + 1).any(2)  # (heads, B * R, 1 + Dv)
    rows = torch.isnan(q).any(-1, keepdim=True) | routed[:, :, None, :1]  # (heads, B * R, T, 1)
    return rows | routed[:, :, None, 1:]


def routed_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor,
    scale: float,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token attention of every query region over its routed regions, region-major layout.

    ``q, k``: ``(B, R, T, heads, D)``; ``v``: ``(B, R, T, heads, Dv)``; ``index``: ``(B, R, topk)``; ``key_valid``:
    optional ``(R, T)`` bool, keys that take part (the others are left out of every softmax).
    Returns ``(B, R, T, heads, Dv)`` (a permuted view of a contiguous ``(heads, B, R, T, Dv)`` tensor).
    """
    B, R, T, heads, D = q.shape
    q_ho, k_ho, v_ho = _heads_outer(q), _heads_outer(k), _heads_outer(v)
    nonfinite = may_hold_nonfinite([q_ho, k_ho, v_ho])
    out = _attend_regions(q_ho, k_ho, v_ho, index, scale, key_valid, nonfinite)
    return out.view(heads, B, R, T, v.shape[-1]).permute(1, 2, 3, 0, 4)


def map_to_regions(x: torch.Tensor, n_win: int) -> torch.Tensor:
    """``(B, H, W, heads, D) -> (B, S*S, (H/S) * (W/S), heads, D)`` (region-major copy)."""
    B, H, W, heads, D = x.shape
    x = x.reshape(B, n_win, H // n_win, n_win, W // n_win, heads, D).permute(0, 1, 3, 2, 4, 5, 6)
    return x.reshape(B, n_win * n_win, (H // n_win) * (W // n_win), heads, D)


def regions_to_map(x: torch.Tensor, n_win: int, H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`map_to_regions`: ``(B, S*S, T, heads, D) -> (B, H, W, heads, D)``."""
    B, _, _, heads, D = x.shape
    x = x.reshape(B, n_win, n_win, H // n_win, W // n_win, heads, D).permute(0, 1, 3, 2, 4, 5, 6)
    return x.reshape(B, H, W, heads, D)


def route_map(
    q: torch.Tensor, k: torch.Tensor, n_win: int, topk: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Routing index ``(B, S*S, topk)`` of padded ``(B, H, W, heads, D)`` maps; ``valid`` (``(H, W)`` bool from
    :func:`valid_tokens`) masks padded tokens out of the region means and never-valid regions out of the routing."""
    k_empty: torch.Tensor | None = None
    if valid is not None:
        H, W = valid.shape
        k_empty = ~valid.reshape(n_win, H // n_win, n_win, W // n_win).any(3).any(1).reshape(-1)
    return route_means(region_means(q, n_win, "map", valid), region_means(k, n_win, "map", valid), topk, k_empty)


def bra2d_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_win: int, topk: int, scale: float, mask_padding: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bi-level routing attention on ``(B, H, W, heads, D)`` maps of any size (``v``: ``(B, H, W, heads, Dv)``).

    Sides are zero-padded to multiples of ``n_win`` (:func:`pad_map`); the padded tokens take part in routing and
    attention unless ``mask_padding`` (then they are excluded, see the module docstring). Returns the output
    ``(B, H, W, heads, Dv)`` (contiguous) and the routing index ``(B, S*S, topk)``.
    """
    H, W = q.shape[1], q.shape[2]
    q, k, v = pad_map(q, n_win), pad_map(k, n_win), pad_map(v, n_win)
    B, Hp, Wp, heads, D = q.shape
    key_valid: torch.Tensor | None = None
    # while torch.compile traces, padding (maybe by zero) is assumed, so one graph serves every map size
    padded = torch.compiler.is_compiling() or Hp != H or Wp != W
    if mask_padding and padded:
        valid = valid_tokens(H, W, n_win, q.device)
        key_valid = map_to_regions(valid[None, :, :, None, None], n_win).reshape(n_win * n_win, -1)
    q_ho, k_ho, v_ho = _map_heads_outer(q, n_win), _map_heads_outer(k, n_win), _map_heads_outer(v, n_win)
    # region means from the region-major copies (fast, contiguous); the routing of route_map
    q_means = _region_means_heads_outer(q_ho, B, n_win * n_win, key_valid)
    k_means = _region_means_heads_outer(k_ho, B, n_win * n_win, key_valid)
    k_empty = None if key_valid is None else ~key_valid.any(1)
    index = route_means(q_means, k_means, topk, k_empty)
    # non-finite q or k entries make their region means non-finite: only v needs its own check
    nonfinite = may_hold_nonfinite([q_means, k_means, v_ho])
    out = _attend_regions(q_ho, k_ho, v_ho, index, scale, key_valid, nonfinite)
    rh, rw = Hp // n_win, Wp // n_win
    d_v = v.shape[-1]
    out = out.view(heads, B, n_win, n_win, rh, rw, d_v).permute(1, 2, 4, 3, 5, 0, 6).reshape(B, Hp, Wp, heads, d_v)
    if padded:
        out = out[:, :H, :W]
    return out, index
