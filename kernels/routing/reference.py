"""Pure-PyTorch bi-level routing attention: the gather formulation (oracle, CPU path, TorchScript path).

Only the routed key/value regions are gathered, once each, straight into the head-major layout the attention reads
(one copy of ``topk`` regions per query region, as the official code); queries are viewed, not copied, and the token
attention runs through ``F.scaled_dot_product_attention`` (differentiable, memory-efficient on CPU).
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
    Returns ``(B, R, T, heads, Dv)`` (a transposed view of a contiguous ``(B, R, heads, T, Dv)`` tensor).
    """
    B, R, T, heads, D = q.shape
    Dv = v.shape[-1]
    topk = index.shape[-1]
    batch = torch.arange(B, device=q.device).view(B, 1, 1, 1)
    head = torch.arange(heads, device=q.device).view(1, 1, heads, 1)
    regions = index.view(B, R, 1, topk)
    # (B, heads, R, T, D)[batch, head, regions] -> (B, R, heads, topk, T, D): the one gather copy
    k_sel = k.permute(0, 3, 1, 2, 4)[batch, head, regions].reshape(B * R, heads, topk * T, D)
    v_sel = v.permute(0, 3, 1, 2, 4)[batch, head, regions].reshape(B * R, heads, topk * T, Dv)
    q_heads = q.transpose(2, 3).reshape(B * R, heads, T, D)
    mask: torch.Tensor | None = None
    if key_valid is not None:
        mask = key_valid[index].reshape(B * R, 1, 1, topk * T)
    out = F.scaled_dot_product_attention(q_heads, k_sel, v_sel, attn_mask=mask, scale=scale)
    out = out.view(B, R, heads, T, Dv).transpose(2, 3)
    if may_hold_nonfinite([q, k, v]):
        out = out.masked_fill(_nan_reach(q, k, v, index), float("nan"))
    return out


def _nan_reach(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``(B, R, T, heads, Dv)`` bool, the outputs NaN inputs reach (whatever SDPA does with them): a NaN query entry
    its token's row, a NaN key entry every row of the query regions routed to its region, a NaN value entry
    ``v[..., d]`` channel ``d`` of those rows."""
    B, R, topk = index.shape
    batch = torch.arange(B, device=q.device).view(B, 1, 1)
    key_nan = torch.isnan(k).any(4).any(2)[batch, index].any(2)  # (B, R, heads)
    value_nan = torch.isnan(v).any(2)[batch, index].any(2)  # (B, R, heads, Dv)
    rows = torch.isnan(q).any(4, keepdim=True) | key_nan[:, :, None, :, None]  # (B, R, T, heads, 1)
    return rows | value_nan[:, :, None]


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
    ``(B, H, W, heads, Dv)`` and the routing index ``(B, S*S, topk)``.
    """
    H, W = q.shape[1], q.shape[2]
    q, k, v = pad_map(q, n_win), pad_map(k, n_win), pad_map(v, n_win)
    Hp, Wp = q.shape[1], q.shape[2]
    valid: torch.Tensor | None = None
    key_valid: torch.Tensor | None = None
    # while torch.compile traces, padding (maybe by zero) is assumed, so one graph serves every map size
    padded = torch.compiler.is_compiling() or Hp != H or Wp != W
    if mask_padding and padded:
        valid = valid_tokens(H, W, n_win, q.device)
        key_valid = map_to_regions(valid[None, :, :, None, None], n_win).reshape(n_win * n_win, -1)
    index = route_map(q, k, n_win, topk, valid)
    out = routed_attention_reference(
        map_to_regions(q, n_win), map_to_regions(k, n_win), map_to_regions(v, n_win), index, scale, key_valid
    )
    out = regions_to_map(out, n_win, Hp, Wp)
    if padded:
        out = out[:, :H, :W]
    return out, index
