"""The Triton kernels as differentiable torch custom ops (``torch.ops.attnzoo.na2d_forward`` / ``na2d_backward``).

Registering the kernels with :func:`torch.library.custom_op` makes them opaque to ``torch.compile`` (fake
implementations give output shapes, so the graph does not break) and :func:`torch.library.register_autograd` makes
the forward op differentiable: autograd saves ``q, k, v, rpb``, the output and the log-sum-exp, and calls the
backward op. This is torch's supported replacement for wrapping a kernel in a ``torch.autograd.Function`` (which
``torch.compile`` would have to trace through). Triton itself is imported only when a kernel runs.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("attnzoo::na2d_forward", mutates_args=())
def na2d_forward_op(
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
    """``(out (B, H, W, heads, D), lse (B, heads, H, W) fp32)`` of the Triton forward kernel."""
    from .triton_forward import na2d_forward

    return na2d_forward(q, k, v, rpb, (kernel_h, kernel_w), (dilation_h, dilation_w), scale)


@na2d_forward_op.register_fake
def _(q, k, v, rpb, kernel_h, kernel_w, dilation_h, dilation_w, scale):
    B, H, W, heads, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        (B, heads, H, W), dtype=torch.float32
    )


@torch.library.custom_op("attnzoo::na2d_backward", mutates_args=())
def na2d_backward_op(
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
    from .triton_backward import na2d_backward

    dq, dk, dv, drpb = na2d_backward(
        grad_out.contiguous(), q, k, v, rpb, out, lse, (kernel_h, kernel_w), (dilation_h, dilation_w), scale, rpb_grad
    )
    return dq, dk, dv, drpb if drpb is not None else q.new_empty(0)


@na2d_backward_op.register_fake
def _(grad_out, q, k, v, rpb, out, lse, kernel_h, kernel_w, dilation_h, dilation_w, scale, rpb_grad):
    drpb = torch.empty_like(rpb) if rpb is not None and rpb_grad else q.new_empty(0)
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
        drpb,
    )


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, rpb, kernel_h, kernel_w, dilation_h, dilation_w, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, rpb, out, lse)
    ctx.params = (kernel_h, kernel_w, dilation_h, dilation_w, scale)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, rpb, out, lse = ctx.saved_tensors
    rpb_grad = rpb is not None and ctx.needs_input_grad[3]
    dq, dk, dv, drpb = na2d_backward_op(grad_out, q, k, v, rpb, out, lse, *ctx.params, rpb_grad)
    return dq, dk, dv, drpb if rpb_grad else None, None, None, None, None, None


na2d_forward_op.register_autograd(_backward, setup_context=_setup_context)


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
    out, _ = na2d_forward_op(q, k, v, rpb, *kernel_size, *dilation, scale)
    return out
