"""Both ``na2d`` backends as differentiable torch custom ops, registered by one helper, :func:`register_na2d_ops`:

* ``torch.ops.attnzoo.na2d_forward`` / ``na2d_backward``: the Triton kernels (:mod:`.triton_forward`,
  :mod:`.triton_backward`; Triton is imported only when a kernel runs);
* ``torch.ops.attnzoo.na2d_reference_forward`` / ``na2d_reference_backward``: the tiled PyTorch reference
  (:func:`.reference.na2d_reference_forward` and its hand-written backward).

Each forward op returns ``(out (B, H, W, heads, D), lse (B, heads, H, W))``, the output and the log-sum-exp of every
query (in at least float32), and is made differentiable with :func:`torch.library.register_autograd`: autograd saves
``q, k, v, rpb``, the output and the log-sum-exp and calls the backward op, which returns ``(dq, dk, dv, drpb)``.
Registering the ops makes them opaque to ``torch.compile`` (fake implementations give the output shapes, so the graph
does not break, and one graph serves every map size: nothing inside is traced); this is torch's supported
replacement for a ``torch.autograd.Function``, which ``torch.compile`` would have to trace through.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..tracing import is_exporting
from .reference import na2d_reference, na2d_reference_backward, na2d_reference_forward


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.promote_types(q.dtype, torch.float32)


def register_na2d_ops(name: str, forward: Callable, backward: Callable) -> Callable:
    """Register ``attnzoo::{name}_forward`` and ``attnzoo::{name}_backward`` around the host functions
    ``forward(q, k, v, rpb, kernel_size, dilation, scale) -> (out, lse)`` and ``backward(grad_out, q, k, v, rpb, out,
    lse, kernel_size, dilation, scale, rpb_grad) -> (dq, dk, dv, drpb or None)``, connect them with autograd and
    return the forward op."""

    @torch.library.custom_op(f"attnzoo::{name}_forward", mutates_args=())
    def forward_op(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rpb: torch.Tensor | None,
        kernel_h: int,
        kernel_w: int,
        dilation_h: int,
        dilation_w: int,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return forward(q, k, v, rpb, (kernel_h, kernel_w), (dilation_h, dilation_w), scale)

    @forward_op.register_fake
    def _(q, k, v, rpb, kernel_h, kernel_w, dilation_h, dilation_w, scale):
        B, H, W, heads, _ = q.shape
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        return out, q.new_empty((B, heads, H, W), dtype=_lse_dtype(q))

    @torch.library.custom_op(f"attnzoo::{name}_backward", mutates_args=())
    def backward_op(
        grad_out: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rpb: torch.Tensor | None,
        out: torch.Tensor,
        lse: torch.Tensor,
        kernel_h: int,
        kernel_w: int,
        dilation_h: int,
        dilation_w: int,
        scale: float,
        rpb_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(dq, dk, dv, drpb)``; ``drpb`` is an empty tensor when there is no RPB gradient to compute."""
        kernel_size, dilation = (kernel_h, kernel_w), (dilation_h, dilation_w)
        grad_out = grad_out.contiguous()
        dq, dk, dv, drpb = backward(grad_out, q, k, v, rpb, out, lse, kernel_size, dilation, scale, rpb_grad)
        return dq, dk, dv, drpb if drpb is not None else q.new_empty(0)

    @backward_op.register_fake
    def _(grad_out, q, k, v, rpb, out, lse, kernel_h, kernel_w, dilation_h, dilation_w, scale, rpb_grad):
        drpb = torch.empty_like(rpb) if rpb is not None and rpb_grad else q.new_empty(0)
        contiguous = torch.contiguous_format
        return tuple(torch.empty_like(t, memory_format=contiguous) for t in (q, k, v)) + (drpb,)

    def setup_context(ctx, inputs, output) -> None:
        q, k, v, rpb, kernel_h, kernel_w, dilation_h, dilation_w, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, rpb, out, lse)
        ctx.params = (kernel_h, kernel_w, dilation_h, dilation_w, scale)
        ctx.mark_non_differentiable(lse)

    def backward_rule(ctx, grad_out, grad_lse):
        q, k, v, rpb, out, lse = ctx.saved_tensors
        rpb_grad = rpb is not None and ctx.needs_input_grad[3]
        dq, dk, dv, drpb = backward_op(grad_out, q, k, v, rpb, out, lse, *ctx.params, rpb_grad)
        return dq, dk, dv, drpb if rpb_grad else None, None, None, None, None, None

    forward_op.register_autograd(backward_rule, setup_context=setup_context)
    return forward_op


def _triton_forward(*args):
    from .triton_forward import na2d_forward

    return na2d_forward(*args)


def _triton_backward(*args):
    from .triton_backward import na2d_backward

    return na2d_backward(*args)


na2d_forward_op = register_na2d_ops("na2d", _triton_forward, _triton_backward)
na2d_reference_forward_op = register_na2d_ops("na2d_reference", na2d_reference_forward, na2d_reference_backward)


def na2d_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    rpb: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Differentiable Triton neighborhood attention ``(B, H, W, heads, D) -> (B, H, W, heads, D)``."""
    return na2d_forward_op(q, k, v, rpb, *kernel_size, *dilation, scale)[0]


def na2d_reference_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    rpb: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """The reference: as the custom op while ``torch.compile`` traces (one graph for every size: the tiling is
    computed from the concrete size inside the op; the hand-written backward), as plain tensor ops otherwise (eager,
    autograd, and ``torch.export``: an exported program must not need attnzoo's op to run)."""
    if torch.compiler.is_compiling() and not is_exporting():
        return na2d_reference_forward_op(q, k, v, rpb, *kernel_size, *dilation, scale)[0]
    return na2d_reference(q, k, v, kernel_size, dilation, rpb, scale)
