"""Keeping NaN and infinity local in the attention references (shared by the kernel packages).

A fused CPU attention kernel may turn a NaN query into zeros, and a key/value block shared by several queries carries
its NaN into rows that do not attend to it (``0 * nan = nan``). The references therefore mark the outputs a
non-finite input truly reaches themselves; :func:`may_hold_nonfinite` lets them skip that work on finite inputs.
"""

from __future__ import annotations

import torch


def may_hold_nonfinite(tensors: list[torch.Tensor]) -> bool:
    """Whether any of ``tensors`` holds a NaN or an infinity (one host sync). Always ``True`` while ``torch.compile``
    traces, so the graph has no data-dependent branch (the marking is a no-op on finite inputs). TorchScript-able."""
    if not torch.jit.is_scripting() and torch.compiler.is_compiling():
        return True
    if tensors[0].device.type == "meta":  # shapes only
        return False
    finite = torch.ones((), dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        finite = finite & torch.isfinite(t).all()
    return not bool(finite)
