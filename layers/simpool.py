"""SimPool attention-based global pooling (Psomas et al., "Keep It SimPool", ICCV 2023), device-agnostic.

For tokens ``X`` ``(B, N, C)`` (no class token): ``u = GAP(X)``, ``X^ = LayerNorm(X)``,
``a = softmax((W_q u)(W_k X^)^T / sqrt(d))`` and the pooled vector is ``a X^`` (the normalised tokens are the values;
no value or output projection). With several heads each head attends over its own ``C / heads`` channels.
``gamma`` turns the weighted mean into a weighted generalised mean ``(a (X^ - m)^gamma)^(1/gamma) + m`` (the paper
uses 1.25 for ViTs, 2 for CNNs); ``m`` is each image's minimum of ``X^``, which makes the values non-negative
(our choice for the signed LayerNorm output; ``gamma = 1`` is exactly the weighted mean).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm

__all__ = ["SimPool"]


class SimPool(nn.Module):
    """Attention pooling ``(B, H, W, C)`` (``input_fmt="NHWC"``), ``(B, C, H, W)`` (``"NCHW"``) or ``(B, N, C)``
    (``"NLC"``) -> ``(B, C)``.

    Args:
        dim: channels.
        num_heads: attention heads (``dim`` divisible by it).
        qkv_bias: bias of the query / key projections.
        gamma: exponent of the generalised mean (``None``: the plain attention-weighted mean).
    """

    pool_type = "simpool"  # the ClassifierHead pooling interface

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        qkv_bias: bool = False,
        gamma: float | None = None,
        input_fmt: str = "NHWC",
        eps: float = 1e-6,
        norm_layer: type[nn.Module] = LayerNorm,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if gamma is not None and gamma <= 0:
            raise ValueError(f"gamma must be > 0 (or None), got {gamma}")
        if input_fmt not in ("NHWC", "NCHW", "NLC"):
            raise ValueError(f"input_fmt must be 'NHWC', 'NCHW' or 'NLC', got {input_fmt!r}")
        self.dim = dim
        self.num_heads = num_heads
        self.gamma = 1.0 if gamma is None else float(gamma)
        self.input_fmt = input_fmt
        self.eps = eps
        self.norm = norm_layer(dim, **dd)
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.k = nn.Linear(dim, dim, bias=qkv_bias, **dd)

    def feat_mult(self) -> int:
        return 1

    def is_identity(self) -> bool:
        return False

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        return x.view(B, N, self.num_heads, self.dim // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_fmt == "NCHW":
            x = x.permute(0, 2, 3, 1)
        tokens = x.flatten(1, -2) if x.ndim == 4 else x
        B = tokens.shape[0]
        values = self.norm(tokens)
        q = self._heads(self.q(tokens.mean(dim=1, keepdim=True)))  # (B, heads, 1, d)
        k, v = self._heads(self.k(values)), self._heads(values)  # (B, heads, N, d)
        if self.gamma == 1.0:
            return F.scaled_dot_product_attention(q, k, v).reshape(B, self.dim)
        shift = values.detach().amin(dim=(1, 2)).view(B, 1, 1, 1)
        powered = (v - shift).clamp_min(self.eps).pow(self.gamma)
        pooled = F.scaled_dot_product_attention(q, k, powered).pow(1.0 / self.gamma) + shift
        return pooled.reshape(B, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, gamma={self.gamma}, input_fmt={self.input_fmt}"
