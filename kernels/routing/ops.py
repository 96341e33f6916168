"""The Triton kernels as differentiable torch custom ops (``torch.ops.attnzoo.routed_attention_forward`` /
``routed_attention_backward``).

``routed_attention_forward(q, k, v, index, n_win, layout, scale, valid_h=0, valid_w=0) -> (out, lse)`` and
``routed_attention_backward(dout, q, k, v, index, out, lse, n_win, layout, scale, valid_h=0, valid_w=0)
-> (dq, dk, dv)`` launch the kernels of :mod:`.triton_forward` / :mod:`.triton_backward` (Triton is imported on first
use, so ``TRITON_INTERPRET`` is read then); fake implementations give shapes to ``torch.compile``, which traces the
ops without graph breaks; :func:`torch.library.register_autograd` connects them. ``layout`` is ``"regions"`` or
``"map"`` (:mod:`attnzoo.kernels.routing.layout`); ``lse`` is ``(B, heads, S*S, T)`` float32, base-2,
non-differentiable. ``valid_h, valid_w > 0`` (``"map"`` layout, a map padded beyond ``valid_h x valid_w``) leave keys
at rows ``>= valid_h`` or columns ``>= valid_w`` out of every softmax; ``0`` masks nothing and runs the unmasked
kernels.
"""

from __future__ import annotations

import torch

from .layout import region_shape, token_strides


@torch.library.custom_op("attnzoo::routed_attention_forward", mutates_args=())
def routed_attention_forward_op(
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
    """``(out, lse)`` of the Triton forward kernel."""
    from triton import cdiv

    from ..triton_common import LOG2E, dot_options
    from .triton_forward import _routed_attention_forward_kernel, block_sizes, mask_args

    B, heads, d_qk, d_v = q.shape[0], q.shape[3], q.shape[4], v.shape[4]
    R = n_win * n_win
    T, region_w = region_shape(q, n_win, layout)
    topk = index.shape[-1]
    index = index.to(torch.int32).contiguous()
    out = q.new_empty((*q.shape[:-1], d_v))
    lse = torch.empty((B, heads, R, T), device=q.device, dtype=torch.float32)
    block_m, block_n, block_dqk, block_dv = block_sizes(T, topk * T, d_qk, d_v)
    grid = (cdiv(T, block_m), R, B * heads)
    _routed_attention_forward_kernel[grid](
        q, k, v, out, lse, index,
        *token_strides(q, n_win, layout), *token_strides(k, n_win, layout),
        *token_strides(v, n_win, layout), *token_strides(out, n_win, layout),
        index.stride(0), index.stride(1),
        scale * LOG2E.value,
        heads, n_win, R, T, region_w, topk, d_qk, d_v,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DQK=block_dqk, BLOCK_DV=block_dv, **dot_options(q.dtype),
        **mask_args(q, layout, valid_h, valid_w),
    )  # fmt: skip
    return out, lse


@routed_attention_forward_op.register_fake
def _(q, k, v, index, n_win, layout, scale, valid_h=0, valid_w=0):
    T, _ = region_shape(q, n_win, layout)
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    lse = q.new_empty((q.shape[0], q.shape[3], n_win * n_win, T), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("attnzoo::routed_attention_backward", mutates_args=())
def routed_attention_backward_op(
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
    """``(dq, dk, dv)`` of the Triton backward kernels."""
    from triton import cdiv

    from ..triton_common import LOG2E, dot_options
    from .triton_backward import (
        _routed_attention_backward_key_kernel,
        _routed_attention_backward_query_kernel,
        invert_routing_index,
    )
    from .triton_forward import block_sizes, mask_args

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

    block_m, block_n, block_dqk, block_dv = block_sizes(T, topk * T, d_qk, d_v)
    _routed_attention_backward_query_kernel[(cdiv(T, block_m), R, B * heads)](
        q, k, v, out, dout, dq, lse, delta, index,
        *strides["q"], *strides["k"], *strides["v"], *strides["o"], *strides["do"],
        *token_strides(dq, n_win, layout),
        index.stride(0), index.stride(1),
        *common,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DQK=block_dqk, BLOCK_DV=block_dv, **options,
    )  # fmt: skip
    # key side: blocks over one region's tokens; query side: over the (mean topk) routed query tokens
    block_n, block_m, _, _ = block_sizes(T, topk * T, d_qk, d_v)
    _routed_attention_backward_key_kernel[(cdiv(T, block_n), R, B * heads)](
        q, k, v, dout, dk, dv, lse, delta, queries, offsets,
        *strides["q"], *strides["k"], *strides["v"], *strides["do"],
        *token_strides(dk, n_win, layout), *token_strides(dv, n_win, layout),
        *common,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DQK=block_dqk, BLOCK_DV=block_dv, **options,
    )  # fmt: skip
    return dq, dk, dv


@routed_attention_backward_op.register_fake
def _(dout, q, k, v, index, out, lse, n_win, layout, scale, valid_h=0, valid_w=0):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, index, n_win, layout, scale, valid_h, valid_w = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, index, out, lse)
    ctx.args = (n_win, layout, scale, valid_h, valid_w)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, index, out, lse = ctx.saved_tensors
    dq, dk, dv = routed_attention_backward_op(dout, q, k, v, index, out, lse, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


routed_attention_forward_op.register_autograd(_backward, setup_context=_setup_context)
