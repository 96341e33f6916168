"""Swin-style (shifted) window multi-head self-attention, with an optional output gate.

Registered as the ``"window"`` token mixer: maps channels-last ``(B, H, W, C) -> (B, H, W, C)`` for any ``H, W``.
Self-attention runs inside non-overlapping ``Wh x Ww`` windows (Liu et al., 2021, "Swin Transformer"). The map is
zero-padded at the right/bottom to a multiple of the window, cyclically shifted by ``-shift_size`` with
:func:`torch.roll` (SW-MSA), partitioned, attended and merged back. The additive attention mask keeps tokens that came
from different regions of the shifted map apart and hides padded tokens from real queries. An axis whose side is not
larger than the window uses one window covering the whole side, unshifted; the relative position bias of that smaller
window is read from the matching sub-table, so it stays exact.

Parameter names follow timm's Swin ``WindowAttention`` (``qkv``, ``proj``, ``relative_position_bias_table``; the
``relative_position_index`` buffer is not persistent), so timm Swin checkpoints (``attn.*``) load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from .gate import create_gate
from .mixer import MapTokenMixer, register_mixer

WINDOW_PADDINGS = ("mask", "zero")


def _pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    """``value`` as an ``(h, w)`` pair of ints; ``name`` is used in the error message."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


def relative_position_index(
    win_h: int, win_w: int, table_size: tuple[int, int] | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """Index ``(win_h*win_w, win_h*win_w)`` into a Swin relative position bias table.

    Entry ``[i, j]`` addresses the table row of the offset ``(dy, dx) = pos(i) - pos(j)`` between query ``i`` and key
    ``j`` (row-major positions inside the window): ``(dy + Th - 1) * (2 * Tw - 1) + (dx + Tw - 1)``, where the table
    was built for a ``Th x Tw`` window (``table_size``, default ``(win_h, win_w)``; it must not be smaller).
    """
    if table_size is None:
        table_size = (win_h, win_w)
    table_h, table_w = table_size
    if win_h > table_h or win_w > table_w:
        raise ValueError(f"window {(win_h, win_w)} is larger than the bias table's window {(table_h, table_w)}")
    ys = torch.arange(win_h, device=device).repeat_interleave(win_w)  # (N,)
    xs = torch.arange(win_w, device=device).repeat(win_h)  # (N,)
    dy = ys[:, None] - ys[None, :] + (table_h - 1)
    dx = xs[:, None] - xs[None, :] + (table_w - 1)
    return dy * (2 * table_w - 1) + dx


def _window_partition(x: torch.Tensor, win_h: int, win_w: int) -> torch.Tensor:
    """``(B, Hp, Wp, C) -> (B, nW, win_h*win_w, C)``, windows in row-major order."""
    B, Hp, Wp, C = x.shape
    x = x.view(B, Hp // win_h, win_h, Wp // win_w, win_w, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (Hp // win_h) * (Wp // win_w), win_h * win_w, C)


def _window_merge(x: torch.Tensor, win_h: int, win_w: int, Hp: int, Wp: int) -> torch.Tensor:
    """Inverse of :func:`_window_partition`: ``(B, nW, win_h*win_w, C) -> (B, Hp, Wp, C)``."""
    B, _, _, C = x.shape
    x = x.view(B, Hp // win_h, Wp // win_w, win_h, win_w, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, Hp, Wp, C)


def _shift_regions(size: int, window: int, shift: int, device: torch.device | None = None) -> torch.Tensor:
    """Region label ``(size,)`` of every position of a padded, rolled axis.

    Rolling by ``-shift`` moves the first ``shift`` positions to the end of the axis, into the last window, next to
    positions they are not adjacent to in the unshifted map; they get their own label (2). The rest of the last window
    is labelled 1, everything before it 0. Windows never straddle labels other than in the last window.
    """
    pos = torch.arange(size, device=device)
    if shift == 0:
        return torch.zeros_like(pos)
    return (pos >= size - window).long() + (pos >= size - shift).long()


@register_mixer("window")
class WindowAttention2d(MapTokenMixer):
    """(Shifted) window multi-head self-attention with a Swin relative position bias.

    Args:
        dim: input and output channels.
        num_heads: number of heads; ``head_dim = dim // num_heads``.
        window_size: window ``Wh x Ww`` (int or ``(h, w)``); a map side not larger than it uses one unshifted window.
        shift_size: cyclic shift of the windows (int or ``(h, w)``), ``0 <= shift_size < window_size`` per axis.
        qkv_bias: bias of the fused ``qkv`` projection (and of the gate).
        proj_bias: bias of the output projection.
        gate: output gate, ``"none"``, ``"headwise"``, ``"elementwise"`` or ``"moh"`` (see :mod:`attnzoo.layers.gate`).
        moh_topk, moh_shared_heads: routed heads active per token and always-active heads of ``gate="moh"``
            (mixture-of-head routing, :class:`~attnzoo.layers.MoHGate`).
        attn_drop: dropout on the attention weights (training only).
        proj_drop: dropout after the output projection.
        clamp_window: ``True``: a map side not larger than the window gets one unshifted window covering it;
            ``False``: windows keep ``window_size`` and the shift whatever the map size (official downstream).
        padding: the zero-padded tokens of maps that are not multiples of the window: ``"mask"`` (hidden from the
            real queries) or ``"zero"`` (they take part, as in the official downstream backbones).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        window_size: int | tuple[int, int] = 7,
        shift_size: int | tuple[int, int] = 0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        gate: str = "none",
        moh_topk: int | None = None,
        moh_shared_heads: int = 0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        clamp_window: bool = True,
        padding: str = "mask",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if padding not in WINDOW_PADDINGS:
            raise ValueError(f"padding must be one of {WINDOW_PADDINGS}, got {padding!r}")
        window_size = _pair(window_size, "window_size")
        shift_size = _pair(shift_size, "shift_size")
        if min(window_size) < 1:
            raise ValueError(f"window_size must be positive, got {window_size}")
        if not all(0 <= s < w for s, w in zip(shift_size, window_size, strict=True)):
            raise ValueError(
                f"shift_size must satisfy 0 <= shift_size < window_size per axis, got {shift_size} "
                f"for window_size {window_size}"
            )
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.shift_size = shift_size
        self.attn_drop = attn_drop
        self.clamp_window = clamp_window
        self.padding = padding

        win_h, win_w = window_size
        self.relative_position_bias_table = nn.Parameter(
            torch.empty((2 * win_h - 1) * (2 * win_w - 1), num_heads, **dd)
        )
        self.register_buffer(
            "relative_position_index",
            torch.empty(win_h * win_w, win_h * win_w, dtype=torch.long, device=device),
            persistent=False,
        )
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
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
        """Initialise the bias table (truncated normal, std 0.02) and the non-persistent index buffer."""
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.init_non_persistent_buffers()

    @torch.no_grad()
    def init_non_persistent_buffers(self) -> None:
        """(Re)compute ``relative_position_index``, e.g. after materialising a model built on the meta device."""
        index = relative_position_index(*self.window_size, device=self.relative_position_index.device)
        self.relative_position_index.copy_(index)

    def no_weight_decay(self) -> set[str]:
        return {"relative_position_bias_table"}

    def _relative_position_bias(self, win_h: int, win_w: int) -> torch.Tensor:
        """Bias ``(heads, N, N)`` for a ``win_h x win_w`` window (the full window or a smaller, clamped one)."""
        if (win_h, win_w) == self.window_size:
            index = self.relative_position_index
        else:
            index = relative_position_index(win_h, win_w, self.window_size, device=self.relative_position_index.device)
        n = win_h * win_w
        return self.relative_position_bias_table[index.view(-1)].view(n, n, self.num_heads).permute(2, 0, 1)

    def _window_mask(
        self, H: int, W: int, Hp: int, Wp: int, win: tuple[int, int], shift: tuple[int, int], device: torch.device
    ) -> torch.Tensor:
        """Allowed attention ``(nW, N, N)`` (bool) on the padded, rolled ``Hp x Wp`` map.

        A query sees a key of its window if both come from the same region of the shifted map and (``padding="mask"``)
        the key is a real (not padded) token. Padded queries, whose outputs are cropped, see their whole region so
        that no row of the mask is empty (an all-masked row would give NaN).
        """
        region = _shift_regions(Hp, win[0], shift[0], device)[:, None] * 3 + _shift_regions(
            Wp, win[1], shift[1], device
        )
        region = _window_partition(region[None, :, :, None], *win)[0, ..., 0]  # (nW, N)
        same_region = region[:, :, None] == region[:, None, :]
        if self.padding == "zero":
            return same_region
        real = (torch.arange(Hp, device=device) < H)[:, None] & (torch.arange(Wp, device=device) < W)
        real = torch.roll(real, shifts=(-shift[0], -shift[1]), dims=(0, 1))
        real = _window_partition(real[None, :, :, None], *win)[0, ..., 0]  # (nW, N)
        return same_region & (real[:, None, :] | ~real[:, :, None])

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, H, W, C)`` for any ``H, W``. Returns ``(B, H, W, C)``."""
        B, H, W, C = x.shape
        if self.clamp_window:  # an axis not longer than the window gets one window covering it, unshifted
            win = (min(self.window_size[0], H), min(self.window_size[1], W))
            shift = (
                self.shift_size[0] if self.window_size[0] < H else 0,
                self.shift_size[1] if self.window_size[1] < W else 0,
            )
        else:
            win, shift = self.window_size, self.shift_size
        pad_h, pad_w = (-H) % win[0], (-W) % win[1]
        Hp, Wp = H + pad_h, W + pad_w

        inp = x
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        if shift[0] or shift[1]:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        tokens = _window_partition(x, *win)  # (B, nW, N, C)
        _, nW, N, _ = tokens.shape

        # Windows are folded into the head axis, (B, nW*heads, N, head_dim), so one mask (1, nW*heads, N, N) broadcasts
        # over the batch without being copied per sample.
        q, k, v = (
            self.qkv(tokens)
            .view(B, nW, N, 3, self.num_heads, self.head_dim)
            .permute(3, 0, 1, 4, 2, 5)
            .reshape(3, B, nW * self.num_heads, N, self.head_dim)
            .unbind(0)
        )
        bias = self._relative_position_bias(*win).to(q.dtype)  # (heads, N, N)
        if shift[0] or shift[1] or ((pad_h or pad_w) and self.padding == "mask"):
            allowed = self._window_mask(H, W, Hp, Wp, win, shift, x.device)  # (nW, N, N)
            attn_mask = bias.unsqueeze(0).masked_fill(~allowed.unsqueeze(1), float("-inf"))
        else:
            attn_mask = bias.unsqueeze(0).expand(nW, -1, -1, -1)
        attn_mask = attn_mask.reshape(1, nW * self.num_heads, N, N)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop if self.training else 0.0
        )
        # an explicit copy: torch.export would record this reshape as a view when its fake SDPA output (N-major memory)
        # allows one, which the ONNX exporter's SDPA decomposition (heads-major memory) then cannot replay
        out = out.view(B, nW, self.num_heads, N, self.head_dim).transpose(2, 3)
        out = out.clone(memory_format=torch.contiguous_format).view(B, nW, N, C)

        out = _window_merge(out, *win, Hp, Wp)
        if shift[0] or shift[1]:
            out = torch.roll(out, shifts=shift, dims=(1, 2))
        if pad_h or pad_w:
            out = out[:, :H, :W]
        # Gate and projection act per token, so they run after unshifting and cropping (on the real tokens only);
        # the gate input of every output token is the same token of the mixer input.
        if self.gate is not None:
            out = self.gate(inp, out)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, "
            f"shift_size={self.shift_size}, clamp_window={self.clamp_window}, padding={self.padding}"
        )
