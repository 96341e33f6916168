"""(Dilated) neighborhood attention (Hassani et al., NAT 2022 / DiNAT 2022), with an optional output gate.

Registered as the ``"neighborhood"`` token mixer: channels-last ``(B, H, W, C) -> (B, H, W, C)`` for any ``H, W``.
Every token attends to its ``k0 x k1`` neighborhood (windows shift at the borders, NATTEN semantics, see
:func:`attnzoo.kernels.neighborhood.na2d`) with a relative position bias ``rpb (heads, 2k0-1, 2k1-1)``. Parameter
names follow the official NAT / NATTEN module (``qkv``, ``rpb``, ``proj``), so official checkpoints map directly.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from attnzoo.kernels.neighborhood import na2d, na2d_reference

from .gate import create_gate
from .mixer import MapTokenMixer, register_mixer

SMALL_MAPS = ("clamp", "zero_pad")


def _pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
    return pair


@register_mixer("neighborhood")
class NeighborhoodAttention2d(MapTokenMixer):
    """Multi-head 2-D neighborhood attention.

    Args:
        dim: input and output channels.
        num_heads: number of heads; ``head_dim = dim // num_heads``.
        kernel_size: neighborhood size (int or ``(k0, k1)``).
        dilation: dilation (int or ``(d0, d1)``); maps smaller than ``kernel * dilation`` follow ``small_maps``.
        qkv_bias: bias of the fused ``qkv`` projection (and of the gate).
        proj_bias: bias of the output projection.
        rpb: learn a relative position bias table (NAT / DiNAT: yes).
        gate: output gate, ``"none"``, ``"headwise"``, ``"elementwise"`` or ``"moh"`` (see :mod:`attnzoo.layers.gate`).
        moh_topk, moh_shared_heads: routed heads active per token and always-active heads of ``gate="moh"``
            (mixture-of-head routing, :class:`~attnzoo.layers.MoHGate`).
        proj_drop: dropout after the output projection.
        backend: kernel backend of :func:`~attnzoo.kernels.neighborhood.na2d` (``"auto"``, ``"triton"``,
            ``"reference"``). TorchScript always runs the reference.
        small_maps: what a map smaller than ``kernel * dilation`` along an axis gets.
            ``"clamp"`` (default): that axis uses the largest dilation that fits, ``max(1, length // kernel)``, and an
            axis shorter than the kernel is padded and masked by :func:`~attnzoo.kernels.neighborhood.na2d`.
            ``"zero_pad"``: the official NAT / DiNAT semantics (NATTEN <= 0.14's ``NeighborhoodAttention2D``, also
            the Hugging Face models), which the released detection / segmentation backbones were trained with: the
            input is zero-padded at the bottom / right to ``kernel * dilation`` on each short axis *before* the qkv
            projection (padded tokens carry the qkv bias and take part, unmasked), attention runs with the full
            dilation, and the output is cropped.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        kernel_size: int | tuple[int, int] = 7,
        dilation: int | tuple[int, int] = 1,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        rpb: bool = True,
        gate: str = "none",
        moh_topk: int | None = None,
        moh_shared_heads: int = 0,
        proj_drop: float = 0.0,
        backend: str = "auto",
        small_maps: str = "clamp",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if small_maps not in SMALL_MAPS:
            raise ValueError(f"small_maps must be one of {SMALL_MAPS}, got {small_maps!r}")
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.dilation = _pair(dilation, "dilation")
        self.scale = self.head_dim**-0.5
        self.backend = backend
        self.small_maps = small_maps
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        k0, k1 = self.kernel_size
        self.rpb = nn.Parameter(torch.empty(num_heads, 2 * k0 - 1, 2 * k1 - 1, **dd)) if rpb else None
        self.gate = create_gate(
            gate,
            dim,
            num_heads,
            self.head_dim,
            bias=qkv_bias,
            moh_topk=moh_topk,
            moh_shared_heads=moh_shared_heads,
            **dd,
        )
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the RPB table (truncated normal, std 0.02)."""
        if self.rpb is not None:
            trunc_normal_(self.rpb, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"rpb"} if self.rpb is not None else set()

    def effective_dilation(self, height: int, width: int) -> tuple[int, int]:
        """Dilation used on an ``height x width`` map: clamped to ``max(1, side // kernel)`` per axis."""
        d0 = max(1, min(self.dilation[0], height // self.kernel_size[0]))
        d1 = max(1, min(self.dilation[1], width // self.kernel_size[1]))
        return d0, d1

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, H, W, C)`` for any ``H, W``. Returns ``(B, H, W, C)``."""
        B, H, W, C = x.shape
        pad_h, pad_w = 0, 0
        if self.small_maps == "zero_pad":
            dilation = self.dilation
            pad_h = max(0, self.kernel_size[0] * dilation[0] - H)
            pad_w = max(0, self.kernel_size[1] * dilation[1] - W)
        else:
            dilation = self.effective_dilation(H, W)
        padded = pad_h > 0 or pad_w > 0
        inp = F.pad(x, (0, 0, 0, pad_w, 0, pad_h)) if padded else x
        q, k, v = self.qkv(inp).view(B, H + pad_h, W + pad_w, 3, self.num_heads, self.head_dim).unbind(3)
        if torch.jit.is_scripting():
            out = na2d_reference(q, k, v, self.kernel_size, dilation, self.rpb, self.scale, None)
        else:
            out = na2d(
                q, k, v, self.kernel_size, dilation=dilation, rpb=self.rpb, scale=self.scale, backend=self.backend
            )
        out = out.reshape(B, H + pad_h, W + pad_w, C)
        if padded:
            out = out[:, :H, :W].contiguous()
        if self.gate is not None:
            out = self.gate(x, out)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
            f"dilation={self.dilation}, rpb={self.rpb is not None}, small_maps={self.small_maps}"
        )
