"""Token arithmetic shared by the Triton routed-attention kernels: the forward and both backward kernels address,
load, store and mask region tokens through these functions, so each piece is written once.

Token ``t`` of region ``r`` lives at ``(r // S) * s_ry + (r % S) * s_rx + (t // RW) * s_ty + (t % RW) * s_tx`` plus the
batch and head offsets (:mod:`attnzoo.kernels.routing.layout`). A program handles a block of ``BLOCK`` tokens of one
region for one (batch, head): grid ``(blocks, regions, batch * heads)``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def token_offsets(region, t, S, RW, s_ry, s_rx, s_ty, s_tx):
    """Element offset of token ``t`` of region ``region`` (tensors of equal shape)."""
    return (region // S) * s_ry + (region % S) * s_rx + (t // RW) * s_ty + (t % RW) * s_tx


@triton.jit
def token_in_map(region, t, S, RW, RH, H_VALID, W_VALID):
    """Whether token ``t`` of region ``region`` (``"map"`` layout, regions of ``RH x RW`` tokens) lies at a row
    ``< H_VALID`` and a column ``< W_VALID`` of the map."""
    row = (region // S) * RH + t // RW
    col = (region % S) * RW + t % RW
    return (row < H_VALID) & (col < W_VALID)


@triton.jit
def program_block(
    HEADS, T, D_QK, D_V, BLOCK: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr
):  # fmt: skip
    """The token block of this program: ``(region, b, h, tokens, tokens_ok, offs_dqk, dqk_ok, offs_dv, dv_ok)``."""
    pid = tl.program_id(0)
    region = tl.program_id(1)
    bh = tl.program_id(2)
    b = (bh // HEADS).to(tl.int64)
    h = bh % HEADS
    tokens = pid * BLOCK + tl.arange(0, BLOCK)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    return region, b, h, tokens, tokens < T, offs_dqk, offs_dqk < D_QK, offs_dv, offs_dv < D_V


@triton.jit
def token_pointers(ptr, b, h, region, t, offs_d, S, RW, s_b, s_ry, s_rx, s_ty, s_tx, s_h, s_d):
    """Pointers to the ``(len(t), len(offs_d))`` channels ``offs_d`` of tokens ``t`` of regions ``region``."""
    rows = token_offsets(region, t, S, RW, s_ry, s_rx, s_ty, s_tx)
    return ptr + b * s_b + h * s_h + rows[:, None] + offs_d[None, :] * s_d


@triton.jit
def load_tokens(ptr, b, h, region, t, offs_d, mask, S, RW, s_b, s_ry, s_rx, s_ty, s_tx, s_h, s_d):
    """The ``(len(t), len(offs_d))`` block of tokens ``t`` of regions ``region`` (zeros where ``mask`` is off)."""
    pointers = token_pointers(ptr, b, h, region, t, offs_d, S, RW, s_b, s_ry, s_rx, s_ty, s_tx, s_h, s_d)
    return tl.load(pointers, mask=mask, other=0.0)


@triton.jit
def store_tokens(ptr, value, b, h, region, t, offs_d, mask, S, RW, s_b, s_ry, s_rx, s_ty, s_tx, s_h, s_d):
    """Store ``value`` (cast to ``ptr``'s type) at tokens ``t`` of regions ``region``, where ``mask`` is on."""
    pointers = token_pointers(ptr, b, h, region, t, offs_d, S, RW, s_b, s_ry, s_rx, s_ty, s_tx, s_h, s_d)
    tl.store(pointers, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def routed_keys(
    index_row, start, n_keys, T, S, RW, H_VALID, W_VALID, BLOCK_N: tl.constexpr, MASK_PAD: tl.constexpr
):  # fmt: skip
    """Keys ``start .. start + BLOCK_N - 1`` of a query region's ``n_keys = topk * T`` routed keys (key ``n`` is token
    ``n % T`` of region ``index_row[n // T]``): ``(region, t, in_range, key_ok)``; ``key_ok`` also leaves out keys
    of the padding with ``MASK_PAD``."""
    offs_n = start + tl.arange(0, BLOCK_N)
    in_range = offs_n < n_keys
    region = tl.load(index_row + offs_n // T, mask=in_range, other=0)
    t = offs_n % T
    key_ok = in_range
    if MASK_PAD:
        key_ok = key_ok & token_in_map(region, t, S, RW, T // RW, H_VALID, W_VALID)
    return region, t, in_range, key_ok
