"""Argument checks and the empty-input result shared by the public kernel ops (:func:`~attnzoo.kernels.na2d`,
:func:`~attnzoo.kernels.bra2d`, :func:`~attnzoo.kernels.route`, :func:`~attnzoo.kernels.routed_attention`)."""

from __future__ import annotations

import torch


def check_int(value: object, name: str, minimum: int) -> int:
    """``value`` as an int ``>= minimum``: ``TypeError`` for a non-int (floats and bools included), else
    ``ValueError`` below ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_int_pair(value: object, name: str, minimum: int) -> tuple[int, int]:
    """``value`` (an int, or a pair of ints) as a pair of ints ``>= minimum`` (errors as :func:`check_int`)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return check_int(value, name, minimum), value
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"{name} must be an int >= {minimum} or a pair of them, got {type(value).__name__} {value!r}")
    if len(value) != 2:
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return check_int(value[0], name, minimum), check_int(value[1], name, minimum)


def check_head_dims(q: torch.Tensor, v: torch.Tensor) -> None:
    """``ValueError`` unless the heads (dim -2) and the head dims of ``q`` and ``v`` (dim -1) are >= 1."""
    if q.shape[-2] < 1:
        raise ValueError(f"heads (dim -2 of q, k, v) must be >= 1, got shape {tuple(q.shape)}")
    if q.shape[-1] < 1 or v.shape[-1] < 1:
        raise ValueError(f"head dims (last dims of q, k, v) must be >= 1, got {q.shape[-1]} and {v.shape[-1]}")


def empty_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The output of attention over empty inputs (a batch, map or region of size 0): an empty tensor of ``v``'s
    shape, differentiable in ``q``, ``k`` and ``v`` (their gradients are empty too)."""
    return v + (q.sum() + k.sum()) * 0
