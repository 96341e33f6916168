"""Keeping NaN and infinity local in the attention references (shared by the kernel packages).

A fused CPU attention kernel may turn a NaN query into zeros, and a key/value block shared by several queries carries
its NaN into rows that do not attend to it (``0 * nan = nan``). The references therefore mark the outputs a
non-finite input truly reaches themselves; :func:`may_hold_nonfinite` lets them skip that work on finite inputs.
"""

from __future__ import annotations

import torch


def may_hold_nonfinite(tensors: list[torch.Tensor]) -> bool:
    """Whether any of ``tensors`` may hold a NaN or an infinity: a non-finite sum (one reduction per tensor, one host
    sync; a sum that overflows only sends finite inputs down the exact non-finite path). Always ``True`` while
    ``torch.compile`` traces, so the graph has no data-dependent branch (the marking is a no-op on finite inputs).
    TorchScript-able."""
    if not torch.jit.is_scripting() and torch.compiler.is_compiling():
        return True
    if tensors[0].device.type == "meta":  # shapes only
        return False
    total = torch.zeros((), dtype=torch.float32, device=tensors[0].device)
    for t in tensors:
        total = total + t.sum(dtype=torch.promote_types(t.dtype, torch.float32))
    return not bool(torch.isfinite(total))
