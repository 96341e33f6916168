"""Bi-level routing attention (BiFormer): ``route``, ``routed_attention`` and ``bra2d`` with reference and Triton
backends (see :mod:`.api`)."""

from .api import bra2d, default_scale, route, routed_attention

__all__ = ["bra2d", "default_scale", "route", "routed_attention"]
