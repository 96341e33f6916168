"""Fused 2-D neighborhood attention backward (Triton): dQ, dK, dV and d(RPB), deterministic dQ / dK / dV.

With ``P = softmax(S)``, ``dP = dO V^T``, ``dS = P * (dP - delta)`` and ``delta = rowsum(dO * O)``:

* the query kernel tiles queries like the forward, recomputes ``P`` from the saved log-sum-exp over the tile's key
  span and accumulates ``dQ = scale * dS K``; with an RPB it also adds every ``dS`` entry to its table cell in a
  buffer private to the program (atomic adds within the program only), summed over programs afterwards;
* the key kernel tiles keys and walks their *inverse* neighborhood (the queries whose windows contain them,
  :func:`.triton_windows.query_span`), accumulating ``dV = P^T dO`` and ``dK = scale * dS^T Q`` without atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_common import LOG2E, dot, dot_options, launch
from .triton_forward import forward_config, launch_config
from .triton_windows import (
    in_windows,
    key_block,
    map_load,
    map_tile_offsets,
    program_tile,
    query_span,
    query_tile,
    relative_bias,
    span_slots,
    window_start,
)


@triton.jit
def _na2d_backward_query_kernel(
    Q, K, V, RPB, DO, LSE, DELTA, DQ, DRPB,
    sq_b, sq_h, sq_w, sq_n, sq_d,
    sk_b, sk_h, sk_w, sk_n, sk_d,
    sv_b, sv_h, sv_w, sv_n, sv_d,
    sdo_b, sdo_h, sdo_w, sdo_n, sdo_d,
    sdq_b, sdq_h, sdq_w, sdq_n, sdq_d,
    sr_n, sr_h, sr_w,
    heads, H, W, padded_h, padded_w, dil_h, dil_w, tiles_per_group_h, tiles_per_group_w, tiles_w,
    qk_scale_log2, scale, D,
    KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_RPB: tl.constexpr, RPB_GRAD: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    TABLE_W: tl.constexpr = 2 * KERNEL_W - 1
    TABLE: tl.constexpr = (2 * KERNEL_H - 1) * TABLE_W
    pid_tile = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    n = pid_bh % heads
    (
        group_h, group_w, span_start_h, span_h, span_start_w, span_w,
        qpos_h, qpos_w, qrow, qcol, q_ok, qstart_h, qstart_w,
    ) = query_tile(
        pid_tile, tiles_w, tiles_per_group_h, tiles_per_group_w, dil_h, dil_w, padded_h, padded_w, H, W,
        TILE_H, TILE_W, KERNEL_H, KERNEL_W,
    )  # fmt: skip

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_mask = q_ok[:, None] & d_ok[None, :]
    q = map_load(Q, b, n, qrow, qcol, offs_d, sq_b, sq_n, sq_h, sq_w, sq_d, q_mask)
    do = map_load(DO, b, n, qrow, qcol, offs_d, sdo_b, sdo_n, sdo_h, sdo_w, sdo_d, q_mask)
    stat_offs = pid_bh * H * W + qrow * W + qcol
    lse = tl.load(LSE + stat_offs, mask=q_ok, other=0.0) * LOG2E
    delta = tl.load(DELTA + stat_offs, mask=q_ok, other=0.0)

    dq = tl.zeros([TILE_H * TILE_W, BLOCK_D], tl.float32)
    for block_start in range(0, span_h * span_w, BLOCK_K):
        kpos_h, kpos_w, k, v, k_ok, inside = key_block(
            K, V, b, n, block_start, span_start_h, span_start_w, span_h, span_w, group_h, group_w, dil_h, dil_w,
            H, W, offs_d, d_ok, qstart_h, qstart_w,
            sk_b, sk_h, sk_w, sk_n, sk_d, sv_b, sv_h, sv_w, sv_n, sv_d,
            BLOCK_K, KERNEL_H, KERNEL_W,
        )  # fmt: skip
        inside = inside & q_ok[:, None]
        s = dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale_log2
        if HAS_RPB:
            bias, rel_h, rel_w = relative_bias(
                RPB, n, sr_n, sr_h, sr_w, qpos_h[:, None], qpos_w[:, None], kpos_h[None, :], kpos_w[None, :], inside,
                KERNEL_H, KERNEL_W,
            )  # fmt: skip
            s += bias * LOG2E
        p = tl.where(inside, tl.exp2(s - lse[:, None]), 0.0)
        dp = dot(do, tl.trans(v), PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += dot(ds.to(k.dtype), k, PRECISION, UPCAST)
        if RPB_GRAD:
            cell = (pid_bh * tl.num_programs(0) + pid_tile) * TABLE + rel_h * TABLE_W + rel_w
            tl.atomic_add(DRPB + cell, ds, mask=inside)

    dq_ptrs = DQ + map_tile_offsets(b, n, qrow, qcol, offs_d, sdq_b, sdq_n, sdq_h, sdq_w, sdq_d)
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _na2d_backward_key_kernel(
    Q, K, V, RPB, DO, LSE, DELTA, DK, DV,
    sq_b, sq_h, sq_w, sq_n, sq_d,
    sk_b, sk_h, sk_w, sk_n, sk_d,
    sv_b, sv_h, sv_w, sv_n, sv_d,
    sdo_b, sdo_h, sdo_w, sdo_n, sdo_d,
    sdk_b, sdk_h, sdk_w, sdk_n, sdk_d,
    sdv_b, sdv_h, sdv_w, sdv_n, sdv_d,
    sr_n, sr_h, sr_w,
    heads, H, W, padded_h, padded_w, dil_h, dil_w, tiles_per_group_h, tiles_per_group_w, tiles_w,
    qk_scale_log2, scale, D,
    KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_RPB: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_tile = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    n = pid_bh % heads
    group_h, first_h, len_h, group_w, first_w, len_w = program_tile(
        pid_tile, tiles_w, tiles_per_group_h, tiles_per_group_w, dil_h, dil_w, padded_h, padded_w, TILE_H, TILE_W
    )
    span_start_h, span_h = query_span(first_h, len_h, TILE_H, KERNEL_H)
    span_start_w, span_w = query_span(first_w, len_w, TILE_W, KERNEL_W)
    kpos_h, kpos_w, krow, kcol, k_ok = span_slots(
        0, first_h, first_w, TILE_H, TILE_W, group_h, group_w, dil_h, dil_w, H, W, TILE_H * TILE_W
    )

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_mask = k_ok[:, None] & d_ok[None, :]
    k = map_load(K, b, n, krow, kcol, offs_d, sk_b, sk_n, sk_h, sk_w, sk_d, kv_mask)
    v = map_load(V, b, n, krow, kcol, offs_d, sv_b, sv_n, sv_h, sv_w, sv_d, kv_mask)

    dk = tl.zeros([TILE_H * TILE_W, BLOCK_D], tl.float32)
    dv = tl.zeros([TILE_H * TILE_W, BLOCK_D], tl.float32)
    span_h = tl.maximum(span_h, 0)
    span_w = tl.maximum(span_w, 0)
    for block_start in range(0, span_h * span_w, BLOCK_Q):
        qpos_h, qpos_w, qrow, qcol, q_ok = span_slots(
            block_start, span_start_h, span_start_w, span_h, span_w, group_h, group_w, dil_h, dil_w, H, W, BLOCK_Q
        )
        q_mask = q_ok[:, None] & d_ok[None, :]
        q = map_load(Q, b, n, qrow, qcol, offs_d, sq_b, sq_n, sq_h, sq_w, sq_d, q_mask)
        do = map_load(DO, b, n, qrow, qcol, offs_d, sdo_b, sdo_n, sdo_h, sdo_w, sdo_d, q_mask)
        stat_offs = pid_bh * H * W + qrow * W + qcol
        lse = tl.load(LSE + stat_offs, mask=q_ok, other=0.0) * LOG2E
        delta = tl.load(DELTA + stat_offs, mask=q_ok, other=0.0)
        qstart_h = window_start(qpos_h, len_h, KERNEL_H)
        qstart_w = window_start(qpos_w, len_w, KERNEL_W)
        inside = in_windows(qstart_h[None, :], qstart_w[None, :], kpos_h[:, None], kpos_w[:, None], KERNEL_H, KERNEL_W)
        inside = inside & k_ok[:, None] & q_ok[None, :]  # (keys, queries)
        st = dot(k, tl.trans(q), PRECISION, UPCAST) * qk_scale_log2
        if HAS_RPB:
            bias, _, _ = relative_bias(
                RPB, n, sr_n, sr_h, sr_w, qpos_h[None, :], qpos_w[None, :], kpos_h[:, None], kpos_w[:, None], inside,
                KERNEL_H, KERNEL_W,
            )  # fmt: skip
            st += bias * LOG2E
        pt = tl.where(inside, tl.exp2(st - lse[None, :]), 0.0)
        dv += dot(pt.to(do.dtype), do, PRECISION, UPCAST)
        dpt = dot(v, tl.trans(do), PRECISION, UPCAST)
        dst = pt * (dpt - delta[None, :])
        dk += dot(dst.to(q.dtype), q, PRECISION, UPCAST)

    dk_ptrs = DK + map_tile_offsets(b, n, krow, kcol, offs_d, sdk_b, sdk_n, sdk_h, sdk_w, sdk_d)
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    dv_ptrs = DV + map_tile_offsets(b, n, krow, kcol, offs_d, sdv_b, sdv_n, sdv_h, sdv_w, sdv_d)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


def backward_config(dtype: torch.dtype, head_dim: int, kernel_size: tuple[int, int]) -> dict[str, dict[str, int]]:
    """Tiling constexprs and launch options of the two backward kernels, ``{"query": ..., "key": ...}`` (the query
    kernel tiles queries, the key kernel keys, in the ``TILE_H x TILE_W`` tiles of one dilation group that
    :func:`attnzoo.kernels.tiling.na2d_tile` gives the forward), for inputs of ``dtype``. A pure function: the launcher
    and the ahead-of-time check (``benchmarks/triton_aot.py``) both use it. float32 walks 16 keys / queries at a time
    (:func:`.triton_forward.forward_config`); 16-bit key kernels walk 16 queries at a time for heads wider than 32
    (32-query blocks spill on sm_90)."""
    forward = forward_config(dtype, head_dim, kernel_size)
    tile = dict(TILE_H=forward["TILE_H"], TILE_W=forward["TILE_W"], BLOCK_D=forward["BLOCK_D"], num_stages=3)
    if dtype == torch.float32:
        return {"query": dict(tile, BLOCK_K=16, num_warps=8), "key": dict(tile, BLOCK_Q=16, num_warps=4)}
    walk = 32 if forward["BLOCK_D"] <= 32 else 16
    return {"query": dict(tile, BLOCK_K=32, num_warps=4), "key": dict(tile, BLOCK_Q=walk, num_warps=4)}


def _tiling(shape, kernel_size, dilation, config, scale):
    """``(grid, size arguments)`` of a backward kernel tiling the ``(B, H, W, heads, D)`` map as ``config`` says."""
    B, H, W, heads, D = shape
    (padded_h, tpg_h, tiles_h), (padded_w, tpg_w, tiles_w) = launch_config(
        H, W, kernel_size, dilation, (config["TILE_H"], config["TILE_W"])
    )
    sizes = (heads, H, W, padded_h, padded_w, *dilation, tpg_h, tpg_w, tiles_w, scale * LOG2E.value, scale, D)
    return (tiles_h * tiles_w, B * heads), sizes


def na2d_backward(
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
    """Gradients ``(dq, dk, dv, drpb)`` of :func:`.triton_forward.na2d_forward` (``drpb`` is None without an RPB
    table or when ``rpb_grad`` is False); ``dq, dk, dv`` are contiguous ``(B, H, W, heads, D)``."""
    B, H, W, heads, D = q.shape
    delta = (grad_out.float() * out.float()).sum(-1).permute(0, 3, 1, 2).contiguous()  # (B, heads, H, W)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    config = backward_config(q.dtype, D, kernel_size)
    has_rpb = rpb is not None
    rpb_grad = has_rpb and rpb_grad
    rpb_arg = rpb if has_rpb else q
    rpb_strides = rpb.stride() if has_rpb else (0, 0, 0)
    common = dict(KERNEL_H=kernel_size[0], KERNEL_W=kernel_size[1], HAS_RPB=has_rpb, **dot_options(q.dtype))
    table = (2 * kernel_size[0] - 1) * (2 * kernel_size[1] - 1)
    query_grid, query_sizes = _tiling(q.shape, kernel_size, dilation, config["query"], scale)
    partial = torch.zeros((*query_grid[::-1], table) if rpb_grad else (1,), dtype=torch.float32, device=q.device)
    launch(
        _na2d_backward_query_kernel, query_grid,
        q, k, v, rpb_arg, grad_out, lse, delta, dq, partial,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(), *rpb_strides,
        *query_sizes, RPB_GRAD=rpb_grad, **common, **config["query"],
    )  # fmt: skip
    key_grid, key_sizes = _tiling(q.shape, kernel_size, dilation, config["key"], scale)
    launch(
        _na2d_backward_key_kernel, key_grid,
        q, k, v, rpb_arg, grad_out, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(), *rpb_strides,
        *key_sizes, **common, **config["key"],
    )  # fmt: skip
    drpb = None
    if rpb_grad:
        drpb = partial.view(B, heads, query_grid[0], table).sum((0, 2)).view(rpb.shape).to(rpb.dtype)
    return dq, dk, dv, drpb
