"""Fused 2-D neighborhood attention forward (Triton).

One program computes a ``TILE_H x TILE_W`` tile of queries of one dilation group for one (batch, head): it walks the
key span of the tile (the union of the tile's windows, :func:`.triton_windows.key_span`) in blocks of ``BLOCK_K`` keys,
masks keys outside each query's window, adds the RPB and keeps an online softmax in fp32. It writes the output and
the natural-log log-sum-exp of every query (``(B, heads, H, W)``, fp32), the only state the backward needs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..tiling import na2d_tile
from ..triton_common import LN2, LOG2E, block_size, dot, dot_options, finite, launch
from .triton_windows import key_block, map_load, map_tile_offsets, query_tile, relative_bias


@triton.jit
def _na2d_forward_kernel(
    Q, K, V, RPB, Out, LSE,
    sq_b, sq_h, sq_w, sq_n, sq_d,
    sk_b, sk_h, sk_w, sk_n, sk_d,
    sv_b, sv_h, sv_w, sv_n, sv_d,
    so_b, so_h, so_w, so_n, so_d,
    sr_n, sr_h, sr_w,
    heads, H, W, padded_h, padded_w, dil_h, dil_w, tiles_per_group_h, tiles_per_group_w, tiles_w,
    qk_scale_log2, D,
    KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_RPB: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
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
    q = map_load(Q, b, n, qrow, qcol, offs_d, sq_b, sq_n, sq_h, sq_w, sq_d, q_ok[:, None] & d_ok[None, :])
    q_finite = tl.min(finite(q).to(tl.int32), axis=1) > 0

    m_i = tl.full([TILE_H * TILE_W], float("-inf"), tl.float32)
    l_i = tl.zeros([TILE_H * TILE_W], tl.float32)
    acc = tl.zeros([TILE_H * TILE_W, BLOCK_D], tl.float32)
    for block_start in range(0, span_h * span_w, BLOCK_K):
        kpos_h, kpos_w, k, v, k_ok, inside = key_block(
            K, V, b, n, block_start, span_start_h, span_start_w, span_h, span_w, group_h, group_w, dil_h, dil_w,
            H, W, offs_d, d_ok, qstart_h, qstart_w,
            sk_b, sk_h, sk_w, sk_n, sk_d, sv_b, sv_h, sv_w, sv_n, sv_d,
            BLOCK_K, KERNEL_H, KERNEL_W,
        )  # fmt: skip
        s = dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale_log2  # log2 units
        s = tl.where(tl.min(finite(k).to(tl.int32), axis=1)[None, :] > 0, s, float("nan"))
        if HAS_RPB:
            bias, _, _ = relative_bias(
                RPB, n, sr_n, sr_h, sr_w, qpos_h[:, None], qpos_w[:, None], kpos_h[None, :], kpos_w[None, :], inside,
                KERNEL_H, KERNEL_W,
            )  # fmt: skip
            s += bias * LOG2E
        s = tl.where(inside, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet (padding rows) stay at 0
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_finite = finite(v)
        if tl.min(v_finite.to(tl.int32)) == 0:  # v is shared by the tile: keep its non-finite entries out of the dot
            v = tl.where(v_finite, v, 0.0)
            reach = tl.dot(inside.to(tl.float16), (~v_finite).to(tl.float16))  # non-finite entries per neighborhood
            acc = tl.where(reach > 0.0, float("nan"), acc)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = tl.where(q_finite[:, None], acc / l_safe[:, None], float("nan"))
    o_ptrs = Out + map_tile_offsets(b, n, qrow, qcol, offs_d, so_b, so_n, so_h, so_w, so_d)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])
    lse = (m_i + tl.log2(l_safe)) * LN2
    tl.store(LSE + pid_bh * H * W + qrow * W + qcol, lse, mask=q_ok)


def forward_config(dtype: torch.dtype, head_dim: int, kernel_size: tuple[int, int]) -> dict[str, int]:
    """Tiling constexprs (``TILE_H, TILE_W, BLOCK_K, BLOCK_D``) and launch options (``num_warps, num_stages``) of the
    forward kernel for inputs of ``dtype``. A pure function: the launcher and the ahead-of-time check
    (``benchmarks/triton_aot.py``) both use it; the tile is :func:`attnzoo.kernels.tiling.na2d_tile`'s.

    float32 operands (exact products on FMA units, or TF32 ones) take far more registers than 16-bit ones: their 4 x 8
    tiles walk 16-key blocks over 8 warps (32-key blocks spill on sm_80 / sm_90)."""
    tile_h, tile_w = na2d_tile(kernel_size, dtype, "triton")
    common = dict(TILE_H=tile_h, TILE_W=tile_w, BLOCK_D=block_size(head_dim), num_stages=3)
    if dtype == torch.float32:
        return dict(common, BLOCK_K=16, num_warps=8)
    return dict(common, BLOCK_K=32, num_warps=4)


def launch_config(H: int, W: int, kernel_size: tuple[int, int], dilation: tuple[int, int], tile: tuple[int, int]):
    """Per-axis ``(padded length, tiles per group, tiles)`` of the query tiling (see :mod:`.windows`)."""
    config = []
    for length, k, d, t in zip((H, W), kernel_size, dilation, tile):
        per_group = -(-length // d)
        tiles_per_group = -(-per_group // t)
        config.append((max(length, k * d), tiles_per_group, d * tiles_per_group))
    return config


def na2d_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rpb: torch.Tensor | None,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel on ``q, k, v: (B, H, W, heads, D)``; returns ``(out, lse)`` with ``out`` contiguous
    ``(B, H, W, heads, D)`` and ``lse`` fp32 ``(B, heads, H, W)``."""
    B, H, W, heads, D = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, heads, H, W), dtype=torch.float32, device=q.device)
    config = forward_config(q.dtype, D, kernel_size)
    tile = (config["TILE_H"], config["TILE_W"])
    (padded_h, tpg_h, tiles_h), (padded_w, tpg_w, tiles_w) = launch_config(H, W, kernel_size, dilation, tile)
    rpb_arg = rpb if rpb is not None else q
    rpb_strides = rpb.stride() if rpb is not None else (0, 0, 0)
    grid = (tiles_h * tiles_w, B * heads)
    launch(
        _na2d_forward_kernel, grid,
        q, k, v, rpb_arg, out, lse,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3), q.stride(4),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3), k.stride(4),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3), v.stride(4),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3), out.stride(4),
        *rpb_strides,
        heads, H, W, padded_h, padded_w, dilation[0], dilation[1], tpg_h, tpg_w, tiles_w,
        scale * LOG2E.value, D,
        KERNEL_H=kernel_size[0], KERNEL_W=kernel_size[1],
        HAS_RPB=rpb is not None, **dot_options(q.dtype), **config,
    )  # fmt: skip
    return out, lse
