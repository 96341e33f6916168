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

from .layout import region_shape


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
    from .triton_forward import routed_attention_forward

    return routed_attention_forward(q, k, v, index, n_win, layout, scale, valid_h, valid_w)


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
    from .triton_backward import routed_attention_backward

    return routed_attention_backward(dout, q, k, v, index, out, lse, n_win, layout, scale, valid_h, valid_w)


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
