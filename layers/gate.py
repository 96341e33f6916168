"""Output gate for attention mixers (G1 position of Qiu et al., 2025, "Gated Attention for LLMs").

``y' = y * sigmoid(x W_g)`` where ``y`` is the per-head attention output before the output projection and ``x`` the
(pre-normed) mixer input. ``elementwise`` learns one gate per channel of every head (width ``heads * head_dim``, the
layout of timm's ``Attention(gated=True)``, whose ``attn.gate.{weight,bias}`` keys it shares); ``headwise`` learns one
scalar per head (width ``heads``). ``moh`` replaces the sigmoid by mixture-of-head routing (:mod:`attnzoo.layers.moh`:
top-``moh_topk`` routed heads plus ``moh_shared_heads`` always-active ones, weighted by a learned router).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .moh import MoHGate

GATE_MODES = ("none", "headwise", "elementwise")  # the sigmoid output gates
GATES = (*GATE_MODES, "moh")  # every gate kind a mixer takes


def gate_output(y: torch.Tensor, logits: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``y * sigmoid(logits)`` for ``y`` ``(..., heads * head_dim)``: ``logits`` ``(..., heads * head_dim)`` gate every
    element, ``(..., heads)`` every head."""
    gate = torch.sigmoid(logits)
    if gate.shape[-1] == y.shape[-1]:
        return y * gate
    return (y.unflatten(-1, (num_heads, y.shape[-1] // num_heads)) * gate.unsqueeze(-1)).flatten(-2)


class OutputGate(nn.Linear):
    """Sigmoid gate on a per-head output.

    Args:
        dim: width of the gate input ``x``.
        num_heads: number of heads of the gated output.
        head_dim: channels per head of the gated output.
        mode: ``"elementwise"`` (one gate per output channel) or ``"headwise"`` (one gate per head).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        mode: str = "elementwise",
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        if mode not in ("headwise", "elementwise"):
            raise ValueError(f"gate mode must be 'headwise' or 'elementwise', got {mode!r}")
        super().__init__(
            dim, num_heads * head_dim if mode == "elementwise" else num_heads, bias=bias, device=device, dtype=dtype
        )
        self.mode = mode
        self.num_heads = num_heads
        self.head_dim = head_dim

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Gate ``y`` of shape ``(..., heads * head_dim)`` with gate input ``x`` of shape ``(..., dim)``."""
        return gate_output(y, F.linear(x, self.weight, self.bias), self.num_heads)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode}"


def create_gate(
    gate: str | None,
    dim: int,
    num_heads: int,
    head_dim: int,
    bias: bool = True,
    moh_topk: int | None = None,
    moh_shared_heads: int = 0,
    device=None,
    dtype=None,
) -> OutputGate | MoHGate | None:
    """Build the output gate named by ``gate`` (one of :data:`GATES`); ``"none"``/``None`` gives ``None``.
    ``moh_topk`` / ``moh_shared_heads`` configure ``gate="moh"`` (:class:`~attnzoo.layers.MoHGate`) and are errors
    with any other gate."""
    if gate is not None and gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    if gate != "moh" and (moh_topk is not None or moh_shared_heads):
        raise ValueError(
            f"moh_topk / moh_shared_heads only apply to gate='moh', got gate={gate!r} with moh_topk={moh_topk}, "
            f"moh_shared_heads={moh_shared_heads}"
        )
    if gate is None or gate == "none":
        return None
    if gate == "moh":
        return MoHGate(dim, num_heads, head_dim, moh_topk, moh_shared_heads, device=device, dtype=dtype)
    return OutputGate(dim, num_heads, head_dim, mode=gate, bias=bias, device=device, dtype=dtype)
