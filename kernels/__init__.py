"""Fused attention kernels: Triton implementations, pure-PyTorch references, autograd and dispatch.

Each op is one public function with a documented layout and a ``backend=`` argument (see :mod:`.dispatch`).
"""

from .dispatch import BACKENDS, resolve_backend
from .neighborhood import na2d
from .routing import bra2d, route, routed_attention

__all__ = ["BACKENDS", "bra2d", "na2d", "resolve_backend", "route", "routed_attention"]
