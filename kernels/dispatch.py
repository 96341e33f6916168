"""Backend selection shared by every kernel op.

``backend="auto"`` runs CUDA tensors through Triton and everything else through the PyTorch reference;
``"triton"`` forces the kernel (on CPU tensors only under Triton's interpreter, ``TRITON_INTERPRET=1``);
``"reference"`` forces the pure-PyTorch implementation. The fused kernels need Triton ``>= MIN_TRITON``; with an
older Triton ``"auto"`` takes the reference everywhere.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

import torch
from packaging.version import Version

BACKENDS = ("auto", "triton", "reference")
# The oldest Triton the fused kernels are verified on (through its interpreter; checked 3.1 to 3.8: before 3.7 the
# interpreter cannot loop over a bound computed in the kernel). With an older Triton, every op runs the reference.
MIN_TRITON = "3.7"


def triton_available() -> bool:
    """Whether a Triton recent enough for the fused kernels (``>= MIN_TRITON``) is installed."""
    if importlib.util.find_spec("triton") is None:
        return False
    return Version(importlib.metadata.version("triton")) >= Version(MIN_TRITON)


def triton_interpreter_enabled() -> bool:
    """Whether Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Resolve ``backend`` for ``tensors`` to ``"triton"`` or ``"reference"``.

    Raises ``ValueError`` for an unknown backend, tensors on different devices, or ``"triton"`` on tensors Triton
    cannot run on here; ``RuntimeError`` when ``"triton"`` is asked for but no Triton ``>= MIN_TRITON`` is installed.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    device = devices.pop() if devices else torch.device("cpu")
    if backend == "reference":
        return "reference"
    on_cuda = device.type == "cuda"
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "reference"
    if not triton_available():
        raise RuntimeError(
            f"backend='triton' needs the 'triton' package >= {MIN_TRITON}, which is not installed "
            "(use backend='auto' or 'reference')"
        )
    if not on_cuda and not (device.type == "cpu" and triton_interpreter_enabled()):
        raise ValueError(
            f"backend='triton' runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1; got device "
            f"{device.type!r} (use backend='auto' or 'reference')"
        )
    return "triton"
