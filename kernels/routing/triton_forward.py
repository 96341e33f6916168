"""Fused routed-attention forward (Triton).

One program per (query block of a region, query region, batch x head). The ``topk * T`` routed keys of the region
are streamed in blocks of ``BLOCK_N`` straight from the un-gathered K/V (a key block may span several small
regions: key ``n`` is token ``n % T`` of routed region ``index[b, r, n // T]``), with an online softmax in the
base-2 domain and fp32 accumulation. Saves the per-query log-sum-exp (base 2, of the scaled logits) for the backward.
Token addressing follows :mod:`attnzoo.kernels.routing.layout`. With ``MASK_PAD`` (``"map"`` layout only), keys
outside the valid ``H_VALID x W_VALID`` top-left part of the padded map are left out of the softmax.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_common import LOG2E, block_size, dot, dot_options, launch
from .layout import region_shape, token_strides
from .triton_tokens import load_tokens, program_block, routed_keys, store_tokens


@triton.jit
def _routed_attention_forward_kernel(
    Q, K, V, Out, LSE, INDEX,
    sq_b, sq_ry, sq_rx, sq_ty, sq_tx, sq_h, sq_d,
    sk_b, sk_ry, sk_rx, sk_ty, sk_tx, sk_h, sk_d,
    sv_b, sv_ry, sv_rx, sv_ty, sv_tx, sv_h, sv_d,
    so_b, so_ry, so_rx, so_ty, so_tx, so_h, so_d,
    si_b, si_r,
    qk_scale_log2,
    HEADS, S, R, T, RW, TOPK, D_QK, D_V, H_VALID, W_VALID,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    MASK_PAD: tl.constexpr,
):  # fmt: skip
    r, b, h, offs_m, m_valid, offs_dqk, dqk_valid, offs_dv, dv_valid = program_block(
        HEADS, T, D_QK, D_V, BLOCK_M, BLOCK_DQK, BLOCK_DV
    )
    q = load_tokens(
        Q, b, h, r, offs_m, offs_dqk, m_valid[:, None] & dqk_valid[None, :],
        S, RW, sq_b, sq_ry, sq_rx, sq_ty, sq_tx, sq_h, sq_d,
    )  # fmt: skip

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
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
        s = dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale_log2
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = m_new
        if MASK_PAD:  # no valid key yet: keep exp2 finite (p = alpha = 0)
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_tokens(
            V, b, h, region, t, offs_dv, n_valid[:, None] & dv_valid[None, :],
            S, RW, sv_b, sv_ry, sv_rx, sv_ty, sv_tx, sv_h, sv_d,
        )  # fmt: skip
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new

    store_tokens(
        Out, acc / l_i[:, None], b, h, r, offs_m, offs_dv, m_valid[:, None] & dv_valid[None, :],
        S, RW, so_b, so_ry, so_rx, so_ty, so_tx, so_h, so_d,
    )  # fmt: skip
    # LSE: contiguous (B, heads, R, T)
    tl.store(LSE + ((b * HEADS + h) * R + r) * T + offs_m, m_i + tl.log2(l_i), mask=m_valid)


def forward_config(dtype: torch.dtype, tokens: int, keys: int, d_qk: int, d_v: int) -> dict[str, int]:
    """Block constexprs (``BLOCK_M`` queries, ``BLOCK_N`` keys, ``BLOCK_DQK``, ``BLOCK_DV``) and launch options
    (``num_warps, num_stages``) of the forward kernel for regions of ``tokens`` tokens, ``keys`` routed keys and inputs
    of ``dtype``. A pure function: the launcher and the ahead-of-time check (``benchmarks/triton_aot.py``) both use it.

    Blocks are >= 16 (``tl.dot``), at most 64 (32 for heads wider than 64). float32 operands (exact products on FMA
    units, or TF32 ones) take far more registers than 16-bit ones: 32 queries and 16 keys per block, as larger blocks
    spill on sm_80 / sm_90."""
    block_dqk, block_dv = block_size(d_qk), block_size(d_v)
    cap = 64 if max(block_dqk, block_dv) <= 64 else 32
    query_cap, key_cap = (32, 16) if dtype == torch.float32 else (cap, cap)
    return dict(
        BLOCK_M=min(query_cap, block_size(tokens)),
        BLOCK_N=min(key_cap, block_size(keys)),
        BLOCK_DQK=block_dqk,
        BLOCK_DV=block_dv,
        num_warps=4,
        num_stages=3,
    )


def mask_args(q: torch.Tensor, layout: str, valid_h: int, valid_w: int) -> dict[str, object]:
    """Kernel arguments of the padded-key mask: on only for a ``"map"`` actually padded beyond ``valid_h x valid_w``."""
    on = layout == "map" and valid_h > 0 and (valid_h < q.shape[1] or valid_w < q.shape[2])
    return {"H_VALID": valid_h, "W_VALID": valid_w, "MASK_PAD": on}


def routed_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor,
    n_win: int,
    layout: str,
    scale: float,
    valid_h: int = 0,
    valid_w: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel (arguments of :func:`attnzoo.kernels.routing.ops.routed_attention_forward_op`);
    returns ``(out, lse)``: ``out`` like ``q`` with ``v``'s last dim, ``lse`` float32 ``(B, heads, S*S, T)``."""
    B, heads, d_qk, d_v = q.shape[0], q.shape[3], q.shape[4], v.shape[4]
    R = n_win * n_win
    T, region_w = region_shape(q, n_win, layout)
    topk = index.shape[-1]
    index = index.to(torch.int32).contiguous()
    out = q.new_empty((*q.shape[:-1], d_v))
    lse = torch.empty((B, heads, R, T), device=q.device, dtype=torch.float32)
    config = forward_config(q.dtype, T, topk * T, d_qk, d_v)
    launch(
        _routed_attention_forward_kernel, (triton.cdiv(T, config["BLOCK_M"]), R, B * heads),
        q, k, v, out, lse, index,
        *token_strides(q, n_win, layout), *token_strides(k, n_win, layout),
        *token_strides(v, n_win, layout), *token_strides(out, n_win, layout),
        index.stride(0), index.stride(1),
        scale * LOG2E.value,
        heads, n_win, R, T, region_w, topk, d_qk, d_v,
        **dot_options(q.dtype), **mask_args(q, layout, valid_h, valid_w), **config,
    )  # fmt: skip
    return out, lse
