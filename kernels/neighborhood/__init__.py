"""Neighborhood attention (NAT / DiNAT): the public :func:`na2d`, its pure-PyTorch reference and Triton kernels."""

from .api import na2d
from .reference import na2d_reference

__all__ = ["na2d", "na2d_reference"]
