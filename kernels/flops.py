"""Multiply-accumulate counting that does not depend on the torch build.

:func:`count_macs` runs a model under :class:`MacCounter`, a dispatch mode that counts every aten op with torch's own
FLOP formulas (``torch.utils.flop_counter``) plus formulas torch lacks on some versions (CPU fused SDPA), and lets the
fused attention ops report their exact cost through :func:`charged`: inside ``na2d``/``bra2d``/``routed_attention``
the ops that implement them (padded tiles of the reference, a Triton launch) are not counted, their formula is. The
result is the fvcore convention of the papers: one multiply-add is one MAC; softmax, norms and element-wise ops
count nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

__all__ = ["MacCounter", "charged", "count_macs", "na2d_macs", "routed_attention_macs", "sdpa_macs"]

_aten = torch.ops.aten


def sdpa_macs(batch: int, heads: int, queries: int, keys: int, d_qk: int, d_v: int) -> int:
    """MACs of ``softmax(q k^T) v`` for ``queries`` x ``keys`` logits per head: ``q k^T`` plus ``p v``."""
    return batch * heads * queries * keys * (d_qk + d_v)


def _sdpa_shapes(q: torch.Size, k: torch.Size, v: torch.Size) -> tuple[int, int, int, int, int, int]:
    """``(batch, heads, queries, keys, d_qk, d_v)`` of ``(..., L, D)`` SDPA operands (leading dims flattened)."""
    batch = math.prod(q[:-2])
    return batch, 1, q[-2], k[-2], q[-1], v[-1]


def _sdpa_forward_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return 2 * sdpa_macs(*_sdpa_shapes(query, key, value))


def _sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return 4 * sdpa_macs(*_sdpa_shapes(query, key, value))  # dQ, dK (q k^T shapes) and dP, dV (p v shapes)


def _with_shapes(formula: Callable[..., int]) -> Callable[..., int]:
    def on_tensors(*args: Any, out_val: Any = None, **kwargs: Any) -> int:
        return formula(*(a.shape if isinstance(a, torch.Tensor) else a for a in args))

    return on_tensors


# torch counts the CUDA SDPA kernels; the CPU fused kernel is counted only by some versions: count it everywhere.
_EXTRA_FORMULAS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _with_shapes(_sdpa_forward_flops),
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _with_shapes(_sdpa_backward_flops),
}


def _axis_keys(length: int, kernel: int, dilation: int) -> int:
    """Keys seen along one axis, summed over its queries (NATTEN semantics; maps shorter than ``kernel * dilation``
    are padded at the end and the padded keys do not count)."""
    if length >= kernel * dilation:
        return length * kernel
    return sum(-(-(length - i % dilation) // dilation) for i in range(length))


def na2d_macs(
    shape: tuple[int, ...], kernel_size: tuple[int, int], dilation: tuple[int, int] = (1, 1), d_v: int | None = None
) -> int:
    """MACs of 2-D neighborhood attention on ``(B, H, W, heads, D)`` queries: every query against its neighbours."""
    B, H, W, heads, D = shape
    keys = _axis_keys(H, kernel_size[0], dilation[0]) * _axis_keys(W, kernel_size[1], dilation[1])
    return B * heads * keys * (D + (D if d_v is None else d_v))


def routed_attention_macs(batch: int, regions: int, tokens: int, heads: int, d_qk: int, d_v: int, topk: int) -> int:
    """MACs of routed attention: every token of ``regions`` regions against the ``topk * tokens`` routed keys."""
    return sdpa_macs(batch * regions, heads, tokens, topk * tokens, d_qk, d_v)


class MacCounter(TorchDispatchMode):
    """Counts multiply-accumulates of the aten ops run under it (``with MacCounter() as c: ...; c.macs``)."""

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0
        self._charged_depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        formula = _EXTRA_FORMULAS.get(packet) or flop_registry.get(packet)
        if formula is None and func is not torch.ops.prim.device.default:
            with self:  # count through decompositions (as FlopCounterMode does)
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if formula is not None and not self._charged_depth:
            self.macs += formula(*args, **kwargs, out_val=out) // 2
        return out


_active: list[MacCounter] = []


def charged(macs: Callable[[], int], fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``; inside a :func:`count_macs` run, ``macs()`` is counted instead of the ops ``fn`` runs.

    Outside a counted run it only calls ``fn`` (``macs`` is not evaluated; ``torch.compile`` sees a plain call).
    """
    if not _active or _active[-1]._charged_depth:
        return fn(*args)
    counter = _active[-1]
    counter.macs += macs()
    counter._charged_depth += 1
    try:
        return fn(*args)
    finally:
        counter._charged_depth -= 1


def count_macs(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, Any]:
    """Run ``fn(*args, **kwargs)`` (e.g. a model on an input) without autograd; return ``(MACs, output)``."""
    counter = MacCounter()
    _active.append(counter)
    try:
        with torch.no_grad(), counter:
            out = fn(*args, **kwargs)
    finally:
        _active.pop()
    return counter.macs, out
