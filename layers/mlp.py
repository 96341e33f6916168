"""MLP with a depth-wise convolution on its hidden map (the feed-forward network of RMT / PPMA)."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["DWConvMlp"]


class DWConvMlp(nn.Module):
    """``fc1 -> act -> h + DWConv_kxk(h) -> fc2`` on a channels-last map ``(B, H, W, C)``.

    Takes :class:`attnzoo.layers.TransformerBlock`'s ``mlp_layer`` arguments.

    Args:
        in_features: input channels.
        hidden_features: hidden width (default ``in_features``).
        out_features: output channels (default ``in_features``).
        act_layer: activation after ``fc1``.
        bias: biases of ``fc1`` / ``fc2``.
        drop: dropout after the activation and after ``fc2``.
        kernel_size: odd kernel of the depth-wise convolution (with bias) whose output is added to the hidden map.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        bias: bool = True,
        drop: float = 0.0,
        kernel_size: int = 3,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int to keep the map size, got {kernel_size}")
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias, **dd)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.dwconv = nn.Conv2d(
            hidden_features, hidden_features, kernel_size, padding=kernel_size // 2, groups=hidden_features, **dd
        )
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias, **dd)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, H, W, C)``. Returns ``(B, H, W, out_features)``."""
        if x.ndim != 4:
            raise ValueError(f"DWConvMlp takes channels-last maps (B, H, W, C), got shape {list(x.shape)}")
        x = self.drop1(self.act(self.fc1(x)))
        x = x + self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.drop2(self.fc2(x))
