"""Efficient probing (EP; Psomas et al., "Attention, Please! Revisiting Attentive Probing Through the Lens of
Efficiency", arXiv:2506.10178), device-agnostic.

A multi-query cross-attention pooling over tokens ``X`` ``(B, N, D)`` with no projection on the key side and one
value projection: ``M`` learned queries ``Q`` ``(M, D)`` give ``A = softmax(Q X^T / sqrt(D))`` ``(B, M, N)``; the
values ``V = X W_v`` ``(B, N, D / d_out)`` are split channel-wise into ``M`` groups and query ``m`` pools its own
group, ``o_m = A_m V_m``; the output is ``[o_1, ..., o_M]`` ``(B, D / d_out)``. Parameters: ``M D + D^2 / d_out``
(the paper's default ``M = 32``, ``d_out = 1``, no bias: 614,400 on a ViT-B).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

__all__ = ["EfficientProbing"]


class EfficientProbing(nn.Module):
    """EP pooling ``(B, H, W, C)`` (``input_fmt="NHWC"``), ``(B, C, H, W)`` (``"NCHW"``) or ``(B, N, C)`` (``"NLC"``)
    -> ``(B, C // d_out)``.

    Args:
        dim: channels ``D`` of the tokens.
        num_queries: learned queries ``M``; ``dim // d_out`` must be divisible by it.
        d_out: output width divisor (output ``D / d_out``).
        value_bias: bias of the value projection (the paper has none).
    """

    pool_type = "ep"  # the ClassifierHead pooling interface

    def __init__(
        self,
        dim: int,
        num_queries: int = 32,
        d_out: int = 1,
        value_bias: bool = False,
        input_fmt: str = "NHWC",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if num_queries < 1 or d_out < 1:
            raise ValueError(f"num_queries and d_out must be >= 1, got num_queries={num_queries}, d_out={d_out}")
        if dim % d_out or (dim // d_out) % num_queries:
            raise ValueError(
                f"dim // d_out ({dim} // {d_out}) must be divisible by num_queries ({num_queries}): every query pools "
                "an equal share of the value channels"
            )
        if input_fmt not in ("NHWC", "NCHW", "NLC"):
            raise ValueError(f"input_fmt must be 'NHWC', 'NCHW' or 'NLC', got {input_fmt!r}")
        self.dim = dim
        self.num_queries = num_queries
        self.d_out = d_out
        self.out_dim = dim // d_out
        self.input_fmt = input_fmt
        self.scale = dim**-0.5
        self.queries = nn.Parameter(torch.empty(num_queries, dim, device=device, dtype=dtype))
        self.v = nn.Linear(dim, self.out_dim, bias=value_bias, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        trunc_normal_(self.queries, std=0.02)

    def feat_mult(self) -> int:
        return 1

    def is_identity(self) -> bool:
        return False

    def attention(self, tokens: torch.Tensor) -> torch.Tensor:
        """Attention maps ``(B, M, N)`` of the queries over tokens ``(B, N, D)``."""
        logits = torch.einsum("md,bnd->bmn", self.queries * self.scale, tokens)
        return logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_fmt == "NCHW":
            x = x.permute(0, 2, 3, 1)
        tokens = x.flatten(1, -2) if x.ndim == 4 else x
        B, N, _ = tokens.shape
        values = self.v(tokens).view(B, N, self.num_queries, self.out_dim // self.num_queries)
        pooled = torch.einsum("bmn,bnmc->bmc", self.attention(tokens), values)
        return pooled.reshape(B, self.out_dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_queries={self.num_queries}, d_out={self.d_out}, input_fmt={self.input_fmt}"
