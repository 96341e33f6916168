"""Pure-PyTorch bi-level routing attention: the gather formulation (oracle, CPU path, TorchScript path).

Only the routed key/value regions are gathered, once each, straight into the head-major layout the attention reads
(one copy of ``topk`` regions per query region, as the official code); queries are viewed, not copied, and the token
attention runs through ``F.scaled_dot_product_attention`` (differentiable, memory-efficient on CPU).
All functions are TorchScript-compatible; argument checking lives in :mod:`attnzoo.kernels.routing.api`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def region_means(x: torch.Tensor, n_win: int, layout: str) -> torch.Tensor:
    """Mean over each region's tokens, heads x channels flattened: ``(B, S*S, heads * D)``, at least float32."""
    B = x.shape[0]
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if layout == "regions":
        return x.mean(2).reshape(B, x.shape[1], -1)
    H, W = x.shape[1], x.shape[2]
    return x.reshape(B, n_win, H // n_win, n_win, W // n_win, -1).mean((2, 4)).reshape(B, n_win * n_win, -1)


def route_means(q_regions: torch.Tensor, k_regions: torch.Tensor, topk: int) -> torch.Tensor:
    """Top-``topk`` key regions of every query region by affinity ``q_r k_r^T``: ``(B, S*S, topk)`` int64.

    Routing is detached (no gradient flows through it) and computed in at least float32; the positive softmax scale
    of the official affinity does not change the top-k set and is left out.
    """
    affinity = q_regions.detach() @ k_regions.detach().transpose(-1, -2)
    return torch.topk(affinity, topk, dim=-1).indices


def routed_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, scale: float
) -> torch.Tensor:
    """Token attention of every query region over its routed regions, region-major layout.

    ``q, k``: ``(B, R, T, heads, D)``; ``v``: ``(B, R, T, heads, Dv)``; ``index``: ``(B, R, topk)``.
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
    out = F.scaled_dot_product_attention(q_heads, k_sel, v_sel, scale=scale)
    return out.view(B, R, heads, T, Dv).transpose(2, 3)


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


def bra2d_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_win: int, topk: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bi-level routing attention on a map whose sides are multiples of ``n_win``.

    ``q, k``: ``(B, H, W, heads, D)``; ``v``: ``(B, H, W, heads, Dv)``. Returns the output ``(B, H, W, heads, Dv)``
    and the routing index ``(B, S*S, topk)``.
    """
    H, W = q.shape[1], q.shape[2]
    index = route_means(region_means(q, n_win, "map"), region_means(k, n_win, "map"), topk)
    out = routed_attention_reference(
        map_to_regions(q, n_win), map_to_regions(k, n_win), map_to_regions(v, n_win), index, scale
    )
    return regions_to_map(out, n_win, H, W), index
