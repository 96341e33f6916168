"""Fused attention kernels: Triton implementations, pure-PyTorch references, autograd and dispatch.

Each op is one public function with a documented layout and a ``backend=`` argument (see :mod:`.dispatch`).
"""

from .dispatch import BACKENDS, resolve_backend

__all__ = ["BACKENDS", "resolve_backend"]
