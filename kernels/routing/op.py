"""The fused routed attention as a PyTorch custom op with autograd (``torch.compile`` traces it without breaks).

``attnzoo::routed_attention_fwd(q, k, v, index, n_win, layout, scale, valid_h=0, valid_w=0) -> (out, lse)`` and
``attnzoo::routed_attention_bwd(dout, q, k, v, index, out, lse, n_win, layout, scale, valid_h=0, valid_w=0)
-> (dq, dk, dv)`` launch the Triton kernels (imported on first use, so ``TRITON_INTERPRET`` is read then); fake
implementations give shapes to ``torch.compile``; :func:`torch.library.register_autograd` connects them. ``layout``
is ``"regions"`` or ``"map"`` (:mod:`attnzoo.kernels.routing.layout`); ``lse`` is ``(B, heads, S*S, T)`` float32,
base-2, non-differentiable. ``valid_h, valid_w > 0`` (``"map"`` layout, a map padded beyond ``valid_h x valid_w``)
leave keys at rows ``>= valid_h`` or columns ``>= valid_w`` out of every softmax; ``0`` masks nothing and runs the
unmasked kernels.
"""

from __future__ import annotations

import torch

from .layout import region_shape, token_strides


def _pow2_at_least(n: int, low: int = 16) -> int:
    return max(low, 1 << max(n - 1, 0).bit_length())


def _tiles(tokens: int, keys: int, d_qk: int, d_v: int) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_DQK, BLOCK_DV)``: >= 16 (``tl.dot``), smaller blocks for wide heads."""
    block_dqk, block_dv = _pow2_at_least(d_qk), _pow2_at_least(d_v)
    cap = 64 if max(block_dqk, block_dv) <= 64 else 32
    return min(cap, _pow2_at_least(tokens)), min(cap, _pow2_at_least(keys)), block_dqk, block_dv


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _mask_args(q: torch.Tensor, layout: str, valid_h: int, valid_w: int) -> dict[str, object]:
    """Kernel arguments of the padded-key mask: on only for a ``"map"`` actually padded beyond ``valid_h x valid_w``."""
    on = layout == "map" and valid_h > 0 and (valid_h < q.shape[1] or valid_w < q.shape[2])
    return {"H_VALID": valid_h, "W_VALID": valid_w, "MASK_PAD": on}


def _dot_options(x: torch.Tensor) -> dict[str, object]:
    """``tl.dot`` settings: exact fp32 products for float32 inputs (no TF32); bfloat16 products in float32 on the CPU
    interpreter, whose bfloat16 ``tl.dot`` is wrong (Triton 3.x)."""
    return {
        "PRECISION": "ieee" if x.dtype == torch.float32 else None,
        "UPCAST_DOT": x.dtype == torch.bfloat16 and x.device.type == "cpu",
    }


@torch.library.custom_op("attnzoo::routed_attention_fwd", mutates_args=())
def routed_attention_fwd(
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
    from .triton_forward import LOG2_E, routed_attention_fwd_kernel

    B, heads, d_qk, d_v = q.shape[0], q.shape[3], q.shape[4], v.shape[4]
    R = n_win * n_win
    T, region_w = region_shape(q, n_win, layout)
    topk = index.shape[-1]
    index = index.to(torch.int32).contiguous()
    out = q.new_empty((*q.shape[:-1], d_v))
    lse = torch.empty((B, heads, R, T), device=q.device, dtype=torch.float32)
    block_m, block_n, block_dqk, block_dv = _tiles(T, topk * T, d_qk, d_v)
    grid = (_cdiv(T, block_m), R, B * heads)
    routed_attention_fwd_kernel[grid](
        q, k, v, out, lse, index,
        *token_strides(q, n_win, layout), *token_strides(k, n_win, layout),
        *token_strides(v, n_win, layout), *token_strides(out, n_win, layout),
        index.stride(0), index.stride(1),
        scale * LOG2_E,
        heads, n_win, R, T, region_w, topk, d_qk, d_v,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DQK=block_dqk, BLOCK_DV=block_dv, **_dot_options(q),
        **_mask_args(q, layout, valid_h, valid_w),
    )  # fmt: skip
    return out, lse


@routed_attention_fwd.register_fake
def _routed_attention_fwd_fake(q, k, v, index, n_win, layout, scale, valid_h=0, valid_w=0):
    T, _ = region_shape(q, n_win, layout)
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    lse = q.new_empty((q.shape[0], q.shape[3], n_win * n_win, T), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("attnzoo::routed_attention_bwd", mutates_args=())
def routed_attention_bwd(
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
    from .triton_backward import (
        invert_routing_index,
        routed_attention_bwd_dkv_kernel,
        routed_attention_bwd_dq_kernel,
    )
    from .triton_forward import LOG2_E

    B, heads, d_qk, d_v = q.shape[0], q.shape[3], q.shape[4], v.shape[4]
    R = n_win * n_win
    T, region_w = region_shape(q, n_win, layout)
    topk = index.shape[-1]
    index = index.to(torch.int32).contiguous()
    queries, offsets = invert_routing_index(index)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)
    strides = {name: token_strides(t, n_win, layout) for name, t in dict(q=q, k=k, v=v, o=out, do=dout).items()}
    common = (scale, scale * LOG2_E, heads, n_win, R, T, region_w, topk, d_qk, d_v)
    options = {**_dot_options(q), **_mask_args(q, layout, valid_h, valid_w)}

    block_m, block_n, block_dqk, block_dv = _tiles(T, topk * T, d_qk, d_v)
    routed_attention_bwd_dq_kernel[(_cdiv(T, block_m), R, B * heads)](
        q, k, v, out, dout, dq, lse, delta, index,
        *strides["q"], *strides["k"], *strides["v"], *strides["o"], *strides["do"],
        *token_strides(dq, n_win, layout),
        index.stride(0), index.stride(1),
        *common,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DQK=block_dqk, BLOCK_DV=block_dv, **options,
    )  # fmt: skip
    # key side: blocks over one region's tokens; query side: over the (mean topk) routed query tokens
    block_n, block_m, _, _ = _tiles(T, topk * T, d_qk, d_v)
    routed_attention_bwd_dkv_kernel[(_cdiv(T, block_n), R, B * heads)](
        q, k, v, dout, dk, dv, lse, delta, queries, offsets,
        *strides["q"], *strides["k"], *strides["v"], *strides["do"],
        *token_strides(dk, n_win, layout), *token_strides(dv, n_win, layout),
        *common,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DQK=block_dqk, BLOCK_DV=block_dv, **options,
    )  # fmt: skip
    return dq, dk, dv


@routed_attention_bwd.register_fake
def _routed_attention_bwd_fake(dout, q, k, v, index, out, lse, n_win, layout, scale, valid_h=0, valid_w=0):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, index, n_win, layout, scale, valid_h, valid_w = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, index, out, lse)
    ctx.args = (n_win, layout, scale, valid_h, valid_w)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, index, out, lse = ctx.saved_tensors
    dq, dk, dv = routed_attention_bwd(dout, q, k, v, index, out, lse, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd("attnzoo::routed_attention_fwd", _backward, setup_context=_setup_context)
