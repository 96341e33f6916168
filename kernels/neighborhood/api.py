"""``na2d``: 2-D neighborhood attention (NATTEN semantics) with relative position bias and dilation."""

from __future__ import annotations

import torch

from ..arguments import check_head_dims, check_int_pair, empty_output
from ..dispatch import resolve_backend
from ..flops import charged, na2d_macs
from .ops import na2d_reference_op, na2d_triton

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TRITON_HEAD_DIM = 256


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor | None, kernel_size) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 5:
            raise ValueError(f"{name} must have shape (B, H, W, heads, D), got {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor ({', '.join(map(str, FLOAT_DTYPES))}), got {t.dtype}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must have the same shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if rpb is not None:
        expected = (q.shape[3], 2 * kernel_size[0] - 1, 2 * kernel_size[1] - 1)
        if not isinstance(rpb, torch.Tensor) or tuple(rpb.shape) != expected:
            shape = tuple(rpb.shape) if isinstance(rpb, torch.Tensor) else type(rpb).__name__
            raise ValueError(f"rpb must have shape (heads, 2*k0-1, 2*k1-1) = {expected}, got {shape}")
        if rpb.dtype not in FLOAT_DTYPES:
            raise TypeError(f"rpb must be a floating tensor, got {rpb.dtype}")


def na2d(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    dilation: int | tuple[int, int] = 1,
    is_causal: bool = False,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """2-D neighborhood attention, NATTEN's heads-last layout ``q, k, v: (B, H, W, heads, D) -> (B, H, W, heads, D)``.

    Semantics (NATTEN's, per axis with length ``L``, kernel ``k``, dilation ``d``, for query ``i``): the group is
    ``g = i mod d``, the group position ``i' = i div d``, the group length ``L_g = ceil((L - g) / d)``, the window
    start ``start' = clamp(i' - k // 2, 0, L_g - k)`` and the keys are ``(start' + t) * d + g`` for ``t = 0 .. k-1``.
    The 2-D neighborhood is the product of the two axes: every query sees exactly ``k0 * k1`` keys, windows shift at
    the borders and are never truncated. An even ``k`` attends ``k / 2`` positions before the query and ``k / 2 - 1``
    after it. The logits are ``(q . k) * scale`` (``scale`` defaults to ``D ** -0.5``) plus, when ``rpb`` (shape
    ``(heads, 2*k0 - 1, 2*k1 - 1)``) is given, ``rpb[h, (key_row - q_row) / d0 + k0 - 1, (key_col - q_col) / d1 + k1
    - 1]``; the softmax runs over the neighborhood.

    Maps smaller than ``k * d`` along an axis (detection heads meet them) are handled like NATTEN <= 0.14: the axis is
    treated as zero-padded at its end to ``k * d``, windows are laid out on the padded axis, the padded keys are masked
    out (they take no part in the softmax) and only the real queries are returned. Queries then see fewer than
    ``k0 * k1`` keys; the result does not depend on what the padding holds.

    Non-finite inputs stay local, on both backends: a NaN or infinite entry of a query makes its output row NaN, one of
    a key the rows of the queries whose neighborhood holds it, and a value entry ``v[j, d]`` the entries ``out[i, d]``
    of those queries; every other output is what it would be without it.

    Args:
        q, k, v: ``(B, H, W, heads, D)`` float tensors of one dtype (any strides), ``heads, D >= 1``; an empty batch
            or map gives an empty output.
        kernel_size: neighborhood size, int or ``(k0, k1)``, each >= 1 (non-ints raise ``TypeError``).
        stride: only 1 is supported (strided neighborhoods raise ``ValueError``).
        dilation: int or ``(d0, d1)``, each >= 1. A dilation at least the axis length leaves every query alone in its
            group (it sees only itself along that axis); it is clamped to the axis length, which gives the same result
            at the cost of the map.
        is_causal: only ``False`` is supported (causal neighborhoods raise ``ValueError``).
        rpb: optional relative position bias table ``(heads, 2*k0 - 1, 2*k1 - 1)``.
        scale: logit scale, default ``D ** -0.5``.
        backend: ``"auto"`` (Triton for CUDA tensors, else the reference), ``"triton"`` (CUDA, or CPU under
            ``TRITON_INTERPRET=1``) or ``"reference"`` (pure PyTorch, any device, float64 included).
    """
    kernel_size = check_int_pair(kernel_size, "kernel_size", 1)
    dilation = check_int_pair(dilation, "dilation", 1)
    if check_int_pair(stride, "stride", 1) != (1, 1):
        raise ValueError(f"stride must be 1 (strided neighborhood attention is not supported), got {stride!r}")
    if is_causal is not False:
        raise ValueError("is_causal must be False (causal neighborhood attention is not supported)")
    _check_inputs(q, k, v, rpb, kernel_size)
    check_head_dims(q, v)
    if q.numel() == 0:
        return empty_output(q, k, v)
    # a dilation >= the axis length leaves every query alone in its group (it sees only itself along that axis), as
    # the axis length does: clamping keeps the result and the cost bounded by the map, not by the dilation
    dilation = (max(1, min(dilation[0], q.shape[1])), max(1, min(dilation[1], q.shape[2])))
    if scale is None:
        scale = q.shape[-1] ** -0.5
    tensors = (q, k, v) if rpb is None else (q, k, v, rpb)
    backend = resolve_backend(backend, *tensors)
    macs = lambda: na2d_macs(tuple(q.shape), kernel_size, dilation)
    return charged(macs, _na2d_dispatch, q, k, v, kernel_size, dilation, rpb, float(scale), backend)


def _na2d_dispatch(q, k, v, kernel_size, dilation, rpb, scale: float, backend: str) -> torch.Tensor:
    if backend == "reference":
        return na2d_reference_op(q, k, v, kernel_size, dilation, rpb, scale)
    if q.dtype not in TRITON_DTYPES:
        raise TypeError(f"backend='triton' supports {', '.join(map(str, TRITON_DTYPES))}, got {q.dtype}")
    if q.shape[-1] > MAX_TRITON_HEAD_DIM:
        raise ValueError(f"backend='triton' tiles head_dim <= {MAX_TRITON_HEAD_DIM}, got {q.shape[-1]}")
    return na2d_triton(q, k, v, kernel_size, dilation, rpb, scale)
