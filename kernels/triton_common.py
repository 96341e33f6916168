"""Triton helpers shared by the kernel packages (:mod:`.neighborhood`, :mod:`.routing`): the matmul and its precision
policy, the base-2 constants of the online softmax, block sizes, and :func:`launch`, through which every kernel is
started (:func:`record_launches` collects the launches instead, for ahead-of-time compilation without a GPU).

Precision policy (every kernel): ``tl.dot`` accumulates in fp32. float32 inputs multiply in exact fp32 (``"ieee"``)
unless torch allows TF32 matmuls (``torch.backends.cuda.matmul.allow_tf32 = True`` or
``torch.set_float32_matmul_precision("high" | "medium")``), then in TF32, like torch's own float32 matmuls; float16
and bfloat16 multiply on their tensor cores. Under Triton's CPU interpreter, whose bfloat16 ``tl.dot`` is wrong
(Triton 3.x), bfloat16 products are computed in fp32 instead.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from .dispatch import triton_interpreter_enabled

LOG2E = tl.constexpr(1.4426950408889634)
"""``log2(e)``: ``exp(x) = exp2(x * LOG2E)``, the kernels keep logits in base 2 (host code uses ``LOG2E.value``)."""
LN2 = tl.constexpr(0.6931471805599453)
"""``ln(2)``: ``log(x) = log2(x) * LN2``."""


def tf32_allowed() -> bool:
    """Whether torch allows TF32 for float32 matmuls (either of its switches)."""
    return torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"


def dot_options(dtype: torch.dtype) -> dict[str, object]:
    """The ``PRECISION`` and ``UPCAST`` kernel arguments of :func:`dot` for inputs of ``dtype`` (module docstring)."""
    return {
        "PRECISION": "ieee" if dtype == torch.float32 and not tf32_allowed() else "tf32",
        "UPCAST": dtype == torch.bfloat16 and triton_interpreter_enabled(),
    }


def block_size(n: int, low: int = 16) -> int:
    """``n`` rounded up to a power of two, at least ``low`` (``tl.dot`` needs dims >= 16)."""
    return max(low, triton.next_power_of_2(n))


@dataclass(frozen=True)
class Launch:
    """One kernel launch ``kernel[grid](*args, **kwargs)``; ``kwargs`` holds the constexprs and the launch options
    (``num_warps``, ``num_stages``)."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict[str, Any]


_RECORDER: contextvars.ContextVar[list[Launch] | None] = contextvars.ContextVar("attnzoo_launch_recorder", default=None)


@contextlib.contextmanager
def record_launches() -> Iterator[list[Launch]]:
    """Inside the block :func:`launch` appends to the yielded list instead of running the kernel, so the host code of
    the ops can run on ``meta`` tensors and hand its exact launches to an ahead-of-time compiler
    (``benchmarks/triton_aot.py``). Output buffers stay uninitialised."""
    launches: list[Launch] = []
    token = _RECORDER.set(launches)
    try:
        yield launches
    finally:
        _RECORDER.reset(token)


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """Run ``kernel[grid](*args, **kwargs)``, or record it inside :func:`record_launches`."""
    recorder = _RECORDER.get()
    if recorder is not None:
        recorder.append(Launch(kernel, tuple(grid), args, kwargs))
        return
    kernel[grid](*args, **kwargs)


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``tl.dot`` with fp32 accumulation; ``UPCAST`` multiplies in fp32 (see :func:`dot_options`)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def finite(x):
    """Elementwise: ``x`` is neither NaN nor infinite."""
    return tl.abs(x) < float("inf")
