"""Fused, deterministic routed-attention backward (Triton): no atomics, every gradient element written once.

* ``_routed_attention_backward_query_kernel``: one program per (query block, query region, batch x head) walks the same
  routed keys as the forward, recomputes the probabilities from the saved log-sum-exp and accumulates ``dQ``; it also
  stores ``delta = rowsum(dO * O)`` for the second kernel.
* ``_routed_attention_backward_key_kernel``: one program per (key block, key region, batch x head) walks the *inverted*
  routing index — the (query region, slot) pairs that routed to this key region, built by
  :func:`invert_routing_index` with a stable sort — and accumulates ``dK`` and ``dV`` for its keys. Query tokens of
  several small regions share one block (query ``m`` of the list is token ``m % T`` of entry ``m // T``).

With ``MASK_PAD`` (``"map"`` layout only) keys outside the valid ``H_VALID x W_VALID`` part of the map get zero
probability, as in the forward; their ``dK`` and ``dV`` are zero.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_common import LOG2E, dot, dot_options, launch
from .layout import region_shape, token_strides
from .triton_forward import forward_config, mask_args
from .triton_tokens import load_tokens, program_block, routed_keys, store_tokens, token_in_map


def invert_routing_index(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert ``index`` ``(B, R, topk)`` (query region -> key regions).

    Returns ``queries`` ``(B, R * topk)`` int32 — for each batch, the query region of every routing entry, grouped by
    key region (stable: ascending query region within a group) — and ``offsets`` ``(B, R + 1)`` int32: the entries of
    key region ``kr`` are ``queries[b, offsets[b, kr]:offsets[b, kr + 1]]``. A region selected twice by the same
    query region appears twice, so duplicated indices stay correct.
    """
    B, R, topk = index.shape
    flat = index.reshape(B, R * topk)
    sorted_regions, order = torch.sort(flat, dim=1, stable=True)
    queries = torch.div(order, topk, rounding_mode="floor").to(torch.int32)
    bounds = torch.arange(R + 1, device=index.device, dtype=sorted_regions.dtype).expand(B, R + 1).contiguous()
    offsets = torch.searchsorted(sorted_regions.contiguous(), bounds).to(torch.int32)
    return queries.contiguous(), offsets.contiguous()


@triton.jit
def _routed_attention_backward_query_kernel(
    Q, K, V, Out, DO, DQ, LSE, DELTA, INDEX,
    sq_b, sq_ry, sq_rx, sq_ty, sq_tx, sq_h, sq_d,
    sk_b, sk_ry, sk_rx, sk_ty, sk_tx, sk_h, sk_d,
    sv_b, sv_ry, sv_rx, sv_ty, sv_tx, sv_h, sv_d,
    so_b, so_ry, so_rx, so_ty, so_tx, so_h, so_d,
    sdo_b, sdo_ry, sdo_rx, sdo_ty, sdo_tx, sdo_h, sdo_d,
    sdq_b, sdq_ry, sdq_rx, sdq_ty, sdq_tx, sdq_h, sdq_d,
    si_b, si_r,
    scale, qk_scale_log2,
    HEADS, S, R, T, RW, TOPK, D_QK, D_V, H_VALID, W_VALID,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    MASK_PAD: tl.constexpr,
):  # fmt: skip
    r, b, h, offs_m, m_valid, offs_dqk, dqk_valid, offs_dv, dv_valid = program_block(
        HEADS, T, D_QK, D_V, BLOCK_M, BLOCK_DQK, BLOCK_DV
    )
    qmask = m_valid[:, None] & dqk_valid[None, :]
    omask = m_valid[:, None] & dv_valid[None, :]
    q = load_tokens(Q, b, h, r, offs_m, offs_dqk, qmask, S, RW, sq_b, sq_ry, sq_rx, sq_ty, sq_tx, sq_h, sq_d)
    o = load_tokens(Out, b, h, r, offs_m, offs_dv, omask, S, RW, so_b, so_ry, so_rx, so_ty, so_tx, so_h, so_d)
    do = load_tokens(DO, b, h, r, offs_m, offs_dv, omask, S, RW, sdo_b, sdo_ry, sdo_rx, sdo_ty, sdo_tx, sdo_h, sdo_d)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    stat = ((b * HEADS + h) * R + r) * T + offs_m  # (B, heads, R, T) contiguous
    tl.store(DELTA + stat, delta, mask=m_valid)
    lse = tl.load(LSE + stat, mask=m_valid, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)
    n_keys = TOPK * T
    index_row = INDEX + b * si_b + r * si_r
    for start in range(0, n_keys, BLOCK_N):
        region, t, n_valid, key_ok = routed_keys(
            index_row, start, n_keys, T, S, RW, H_VALID, W_VALID, BLOCK_N, MASK_PAD
        )
        k = load_tokens(
            K, b, h, region, t, offs_dqk, n_valid[:, None] & dqk_valid[None, :],
            S, RW, sk_b, sk_ry, sk_rx, sk_ty, sk_tx, sk_h, sk_d,
        )  # fmt: skip
        v = load_tokens(
            V, b, h, region, t, offs_dv, n_valid[:, None] & dv_valid[None, :],
            S, RW, sv_b, sv_ry, sv_rx, sv_ty, sv_tx, sv_h, sv_d,
        )  # fmt: skip
        s = dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale_log2
        p = tl.where(key_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = dot(do, tl.trans(v), PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += dot(ds.to(k.dtype), k, PRECISION, UPCAST)

    store_tokens(
        DQ, dq * scale, b, h, r, offs_m, offs_dqk, qmask, S, RW, sdq_b, sdq_ry, sdq_rx, sdq_ty, sdq_tx, sdq_h, sdq_d
    )


@triton.jit
def _routed_attention_backward_key_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, QUERIES, OFFSETS,
    sq_b, sq_ry, sq_rx, sq_ty, sq_tx, sq_h, sq_d,
    sk_b, sk_ry, sk_rx, sk_ty, sk_tx, sk_h, sk_d,
    sv_b, sv_ry, sv_rx, sv_ty, sv_tx, sv_h, sv_d,
    sdo_b, sdo_ry, sdo_rx, sdo_ty, sdo_tx, sdo_h, sdo_d,
    sdk_b, sdk_ry, sdk_rx, sdk_ty, sdk_tx, sdk_h, sdk_d,
    sdv_b, sdv_ry, sdv_rx, sdv_ty, sdv_tx, sdv_h, sdv_d,
    scale, qk_scale_log2,
    HEADS, S, R, T, RW, TOPK, D_QK, D_V, H_VALID, W_VALID,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    MASK_PAD: tl.constexpr,
):  # fmt: skip
    kr, b, h, offs_n, n_valid, offs_dqk, dqk_valid, offs_dv, dv_valid = program_block(
        HEADS, T, D_QK, D_V, BLOCK_N, BLOCK_DQK, BLOCK_DV
    )
    kmask = n_valid[:, None] & dqk_valid[None, :]
    vmask = n_valid[:, None] & dv_valid[None, :]
    key_ok = n_valid
    if MASK_PAD:
        key_ok = key_ok & token_in_map(kr, offs_n, S, RW, T // RW, H_VALID, W_VALID)
    k = load_tokens(K, b, h, kr, offs_n, offs_dqk, kmask, S, RW, sk_b, sk_ry, sk_rx, sk_ty, sk_tx, sk_h, sk_d)
    v = load_tokens(V, b, h, kr, offs_n, offs_dv, vmask, S, RW, sv_b, sv_ry, sv_rx, sv_ty, sv_tx, sv_h, sv_d)

    dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    first = tl.load(OFFSETS + b * (R + 1) + kr)
    last = tl.load(OFFSETS + b * (R + 1) + kr + 1)
    queries_row = QUERIES + b * (R * TOPK)
    stats_row = (b * HEADS + h) * R * T
    for start in range(first * T, last * T, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        m_valid = offs_m < last * T
        qr = tl.load(queries_row + offs_m // T, mask=m_valid, other=0)
        t = offs_m % T
        q = load_tokens(
            Q, b, h, qr, t, offs_dqk, m_valid[:, None] & dqk_valid[None, :],
            S, RW, sq_b, sq_ry, sq_rx, sq_ty, sq_tx, sq_h, sq_d,
        )  # fmt: skip
        do = load_tokens(
            DO, b, h, qr, t, offs_dv, m_valid[:, None] & dv_valid[None, :],
            S, RW, sdo_b, sdo_ry, sdo_rx, sdo_ty, sdo_tx, sdo_h, sdo_d,
        )  # fmt: skip
        stat = stats_row + qr * T + t
        lse = tl.load(LSE + stat, mask=m_valid, other=0.0)
        delta = tl.load(DELTA + stat, mask=m_valid, other=0.0)
        s_t = dot(k, tl.trans(q), PRECISION, UPCAST) * qk_scale_log2  # (BLOCK_N, BLOCK_M)
        p_t = tl.where(m_valid[None, :], tl.exp2(s_t - lse[None, :]), 0.0)
        if MASK_PAD:
            p_t = tl.where(key_ok[:, None], p_t, 0.0)
        dv += dot(p_t.to(do.dtype), do, PRECISION, UPCAST)
        dp_t = dot(v, tl.trans(do), PRECISION, UPCAST)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += dot(ds_t.to(q.dtype), q, PRECISION, UPCAST)

    store_tokens(
        DK, dk * scale, b, h, kr, offs_n, offs_dqk, kmask, S, RW, sdk_b, sdk_ry, sdk_rx, sdk_ty, sdk_tx, sdk_h, sdk_d
    )
    store_tokens(DV, dv, b, h, kr, offs_n, offs_dv, vmask, S, RW, sdv_b, sdv_ry, sdv_rx, sdv_ty, sdv_tx, sdv_h, sdv_d)


def backward_config(dtype: torch.dtype, tokens: int, keys: int, d_qk: int, d_v: int) -> dict[str, dict[str, int]]:
    """Block constexprs and launch options of the two backward kernels, ``{"query": ..., "key": ...}``: the query
    kernel blocks like the forward; the key kernel takes the forward's query block of one region's keys
    (``BLOCK_N``) and walks the routed queries in blocks of the forward's key block (``BLOCK_M``, the ``K`` of its
    ``dV`` and ``dK`` products), at most 32 for 16-bit heads wider than 32 (64-query blocks spill on sm_80). A pure
    function: the launcher and the ahead-of-time check (``benchmarks/triton_aot.py``) both use it."""
    query = forward_config(dtype, tokens, keys, d_qk, d_v)
    walk = query["BLOCK_N"]
    if dtype != torch.float32 and max(query["BLOCK_DQK"], query["BLOCK_DV"]) > 32:
        walk = min(walk, 32)
    return {"query": query, "key": dict(query, BLOCK_M=walk, BLOCK_N=query["BLOCK_M"])}


def routed_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    n_win: int,
    layout: str,
    scale: float,
    valid_h: int = 0,
    valid_w: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` (arguments of :func:`attnzoo.kernels.routing.ops.routed_attention_backward_op`)."""
    B, heads, d_qk, d_v = q.shape[0], q.shape[3], q.shape[4], v.shape[4]
    R = n_win * n_win
    T, region_w = region_shape(q, n_win, layout)
    topk = index.shape[-1]
    index = index.to(torch.int32).contiguous()
    queries, offsets = invert_routing_index(index)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)
    strides = {name: token_strides(t, n_win, layout) for name, t in dict(q=q, k=k, v=v, o=out, do=dout).items()}
    common = (scale, scale * LOG2E.value, heads, n_win, R, T, region_w, topk, d_qk, d_v)
    options = {**dot_options(q.dtype), **mask_args(q, layout, valid_h, valid_w)}
    config = backward_config(q.dtype, T, topk * T, d_qk, d_v)
    launch(
        _routed_attention_backward_query_kernel, (triton.cdiv(T, config["query"]["BLOCK_M"]), R, B * heads),
        q, k, v, out, dout, dq, lse, delta, index,
        *strides["q"], *strides["k"], *strides["v"], *strides["o"], *strides["do"],
        *token_strides(dq, n_win, layout),
        index.stride(0), index.stride(1),
        *common, **options, **config["query"],
    )  # fmt: skip
    launch(
        _routed_attention_backward_key_kernel, (triton.cdiv(T, config["key"]["BLOCK_N"]), R, B * heads),
        q, k, v, dout, dk, dv, lse, delta, queries, offsets,
        *strides["q"], *strides["k"], *strides["v"], *strides["do"],
        *token_strides(dk, n_win, layout), *token_strides(dv, n_win, layout),
        *common, **options, **config["key"],
    )  # fmt: skip
    return dq, dk, dv
