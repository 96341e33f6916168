"""The PyTorch reference as an opaque custom op, for ``torch.compile`` with dynamic map sizes.

The reference's tiling indices are computed from the concrete map size. Traced with a symbolic height or width,
every size becomes a guard (one recompilation per resolution) and tracing the index arithmetic takes minutes. While
``torch.compile`` traces, :func:`na2d_reference_compiled` therefore calls the reference through
``torch.ops.attnzoo.na2d_reference`` (output shape = query shape, from the fake implementation), so one graph serves
every size and tracing stays fast. ``torch.export`` / ONNX export still trace the reference (at a fixed size). Its backward (``torch.ops.attnzoo.na2d_reference_backward``) recomputes the forward under
autograd and differentiates it: the same gradients as eager, for one extra forward.
"""

from __future__ import annotations

import torch

from ..tracing import is_exporting
from .reference import na2d_reference


@torch.library.custom_op("attnzoo::na2d_reference", mutates_args=())
def na2d_reference_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rpb: torch.Tensor | None,
    kernel_h: int,
    kernel_w: int,
    dilation_h: int,
    dilation_w: int,
    scale: float,
) -> torch.Tensor:
    """Contiguous ``(B, H, W, heads, D)`` output of :func:`na2d_reference`."""
    return na2d_reference(q, k, v, (kernel_h, kernel_w), (dilation_h, dilation_w), rpb, scale).contiguous()


@na2d_reference_op.register_fake
def _(q, k, v, rpb, kernel_h, kernel_w, dilation_h, dilation_w, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("attnzoo::na2d_reference_backward", mutates_args=())
def na2d_reference_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rpb: torch.Tensor | None,
    kernel_h: int,
    kernel_w: int,
    dilation_h: int,
    dilation_w: int,
    scale: float,
    rpb_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, drpb)`` by differentiating the reference; ``drpb`` is empty when ``rpb_grad`` is false.

    ``torch.func.vjp`` differentiates here although the op runs below the autograd dispatch keys."""
    kernel_size, dilation = (kernel_h, kernel_w), (dilation_h, dilation_w)
    if rpb_grad:
        _, vjp = torch.func.vjp(lambda *t: na2d_reference(*t[:3], kernel_size, dilation, t[3], scale), q, k, v, rpb)
        return vjp(grad_out)
    _, vjp = torch.func.vjp(lambda *t: na2d_reference(*t, kernel_size, dilation, rpb, scale), q, k, v)
    return (*vjp(grad_out), q.new_empty(0))


@na2d_reference_backward_op.register_fake
def _(grad_out, q, k, v, rpb, kernel_h, kernel_w, dilation_h, dilation_w, scale, rpb_grad):
    drpb = torch.empty_like(rpb) if rpb is not None and rpb_grad else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), drpb


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, rpb, kernel_h, kernel_w, dilation_h, dilation_w, scale = inputs
    ctx.save_for_backward(q, k, v, rpb)
    ctx.params = (kernel_h, kernel_w, dilation_h, dilation_w, scale)


def _backward(ctx, grad_out):
    q, k, v, rpb = ctx.saved_tensors
    rpb_grad = rpb is not None and ctx.needs_input_grad[3]
    dq, dk, dv, drpb = na2d_reference_backward_op(grad_out, q, k, v, rpb, *ctx.params, rpb_grad)
    return dq, dk, dv, drpb if rpb_grad else None, None, None, None, None, None


na2d_reference_op.register_autograd(_backward, setup_context=_setup_context)


def na2d_reference_compiled(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    rpb: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """:func:`na2d_reference`, behind the custom op while ``torch.compile`` traces. ``torch.export`` (and the ONNX
    exporter built on it) traces the reference itself: an exported program must not need attnzoo's op to run."""
    if torch.compiler.is_compiling() and not is_exporting():
        return na2d_reference_op(q, k, v, rpb, *kernel_size, *dilation, scale)
    return na2d_reference(q, k, v, kernel_size, dilation, rpb, scale)
