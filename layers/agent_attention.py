"""Agent attention (Han et al., ECCV 2024, "Agent Attention: On the Integration of Softmax and Linear Attention").

A small set of ``n = s * s`` agent tokens ``A`` (the query map average-pooled to an ``s x s`` grid) first gathers
information from all tokens and then broadcasts it back::

    V_A = softmax(A K^T * scale + B1) V          (agent aggregation,  (heads, n, N) logits)
    O   = softmax(Q A^T * scale + B2) V_A + DWC(V)   (agent broadcast,  (heads, N, n) logits)

followed by the output projection. ``DWC`` is a depthwise 3x3 convolution of ``V`` laid out on the ``H x W`` grid.
Cost is linear in the number of tokens ``N``. Both softmaxes are written out (matmul + bias + softmax): the logits
are only ``(heads, n, N)``, and on CPU this is faster than ``F.scaled_dot_product_attention`` with a float mask, whose
math fallback adds scaling and mask checks (see ``benchmarks/bench_agent.py``).

Position biases (trunc-normal init, std 0.02), all kept as ``(heads, agent_num, ...)`` tables:
``B1 = interp(an_bias (heads, n, 7, 7) -> H x W) + ah_bias (heads, n, Gh, 1) + aw_bias (heads, n, 1, Gw)``, and ``B2``
likewise from ``na_bias``, ``ha_bias``, ``wa_bias`` (transposed to ``(heads, N, n)``). The row / column tables are laid
out for a reference grid ``Gh x Gw`` (``grid_size``, the training resolution) and linearly interpolated to the actual
``H x W`` at run time, so the mixer runs at any resolution; without autograd the resulting biases are cached per map
size (see :meth:`AgentAttention.clear_bias_cache`). Prefix (class) tokens of a plain ViT are excluded from the
pooling and the DWC and get their own terms ``ac_bias`` / ``ca_bias`` of shape ``(heads, n, num_prefix_tokens)``.

Downstream agents (``agent_shape``, the official detection / segmentation backbones' ``downstream_agent_shape``): the
queries are pooled to an ``ah x aw`` grid instead (e.g. 9 x 9 = 81 agents for a model trained with 9), and the biases,
after their spatial resize to ``H x W``, are bilinearly resized along the agent axis from the ``s x s`` grid of the
tables to ``ah x aw``, as the official code does (spatially first, then along the agents).

:func:`convert_agent_biases` maps the official checkpoint layout (leading singleton axes; ``ha``/``wa``/``ca`` stored
token-major) onto this one and resamples tables to another grid size or agent count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from attnzoo.kernels.tracing import is_exporting

from .gate import create_gate
from .mixer import check_no_attn_mask, register_mixer

__all__ = ["AGENT_BIAS_NAMES", "AgentAttention", "convert_agent_biases", "resize_agent_bias"]

BLOCK_BIAS_SIZE = 7
"""Side of the ``an_bias`` / ``na_bias`` tables (fixed in the paper)."""

AGENT_BIAS_NAMES = ("an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias", "ac_bias", "ca_bias")


def _pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
    return pair


_CACHE_ENTRIES = 4
"""Map sizes whose inference-time biases one module keeps (the cache is emptied when a fifth size comes)."""


def _cache_allowed(table: torch.Tensor) -> bool:
    """Whether biases built from ``table`` may be cached: not while compiling / exporting / tracing, and not for
    inference-mode parameters (they carry no version counter)."""
    return not (
        torch.compiler.is_compiling()
        or is_exporting()
        or torch.jit.is_tracing()
        or table.is_inference()
        or table.device.type == "meta"
    )


def _resize(table: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``) of the last two axes of a 4-D table; a no-op at the same size
    (skipped, except while ``torch.compile`` traces: one graph then serves every size, and the resize is exact)."""
    if not torch.compiler.is_compiling() and table.shape[-2] == height and table.shape[-1] == width:
        return table
    return F.interpolate(table, size=(height, width), mode="bilinear", align_corners=False)


@register_mixer("agent")
class AgentAttention(nn.Module):
    """Agent attention on a channels-last map ``(B, H, W, C)`` or on tokens ``(B, P + H*W, C)``.

    Args:
        dim: input and output channels.
        num_heads: number of heads; ``head_dim = dim // num_heads``.
        agent_num: number of agent tokens, a perfect square ``s * s`` (the pooled ``s x s`` grid); it sets the bias
            tables' agent axis.
        agent_shape: run-time agent grid ``(ah, aw)`` (int or pair) when it differs from ``s x s`` (the official
            downstream backbones; see the module docstring); ``None``: ``s x s``. Not with prefix tokens.
        grid_size: reference feature-map size ``(Gh, Gw)`` of the row / column bias tables (the training
            resolution: 14 for a ViT/16 at 224, 56 / 28 / 14 / 7 for the stages of a stride-4 pyramid); other map
            sizes interpolate them.
        num_prefix_tokens: leading (class) tokens of token inputs; they need the token layout and ``feat_size``.
        qkv_bias: bias of the fused ``qkv`` projection (and of the gate).
        proj_bias: bias of the output projection.
        gate: output gate on the pre-projection output, ``"none"``, ``"headwise"``, ``"elementwise"`` or ``"moh"``.
        moh_topk, moh_shared_heads: routed heads active per token and always-active heads of ``gate="moh"``
            (mixture-of-head routing, :class:`~attnzoo.layers.MoHGate`).
        attn_drop: dropout on both attention maps (training only).
        proj_drop: dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        agent_num: int = 49,
        agent_shape: int | tuple[int, int] | None = None,
        grid_size: int | tuple[int, int] = 14,
        num_prefix_tokens: int = 0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        gate: str = "none",
        moh_topk: int | None = None,
        moh_shared_heads: int = 0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        pool = math.isqrt(agent_num) if isinstance(agent_num, int) and agent_num > 0 else 0
        if pool * pool != agent_num or pool == 0:
            raise ValueError(f"agent_num must be a positive perfect square (s * s agents), got {agent_num!r}")
        if not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be a non-negative int, got {num_prefix_tokens!r}")
        agent_shape = (pool, pool) if agent_shape is None else _pair(agent_shape, "agent_shape")
        if agent_shape != (pool, pool) and num_prefix_tokens:
            raise ValueError("agent_shape (downstream agents) is not supported with prefix tokens")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.agent_num = agent_num
        self.pool_size = pool
        self.agent_shape = agent_shape
        self.grid_size = _pair(grid_size, "grid_size")
        self.num_prefix_tokens = num_prefix_tokens
        self.attn_drop = attn_drop

        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.dwc = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **dd)
        grid_h, grid_w = self.grid_size
        n = agent_num
        self.an_bias = nn.Parameter(torch.empty(num_heads, n, BLOCK_BIAS_SIZE, BLOCK_BIAS_SIZE, **dd))
        self.na_bias = nn.Parameter(torch.empty(num_heads, n, BLOCK_BIAS_SIZE, BLOCK_BIAS_SIZE, **dd))
        self.ah_bias = nn.Parameter(torch.empty(num_heads, n, grid_h, 1, **dd))
        self.aw_bias = nn.Parameter(torch.empty(num_heads, n, 1, grid_w, **dd))
        self.ha_bias = nn.Parameter(torch.empty(num_heads, n, grid_h, 1, **dd))
        self.wa_bias = nn.Parameter(torch.empty(num_heads, n, 1, grid_w, **dd))
        if num_prefix_tokens:
            self.ac_bias = nn.Parameter(torch.empty(num_heads, n, num_prefix_tokens, **dd))
            self.ca_bias = nn.Parameter(torch.empty(num_heads, n, num_prefix_tokens, **dd))
        else:
            self.register_parameter("ac_bias", None)
            self.register_parameter("ca_bias", None)
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
        self._bias_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Bias tables: truncated normal, std 0.02 (as published)."""
        for name in AGENT_BIAS_NAMES:
            table = getattr(self, name)
            if table is not None:
                trunc_normal_(table, std=0.02)

    def _position_bias(
        self,
        block: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
        prefix: torch.Tensor | None,
        height: int,
        width: int,
    ) -> torch.Tensor:
        """Agent-major bias ``(heads, n, P + H*W)`` from a block table, row / column terms and prefix terms."""
        spatial = _resize(block, height, width) + _resize(rows, height, 1) + _resize(cols, 1, width)
        spatial = spatial.flatten(2)
        if prefix is not None:
            spatial = torch.cat([prefix, spatial], dim=-1)
        return spatial

    def _biases(self, height: int, width: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``B1`` ``(heads, n, P + H*W)`` and ``B2`` ``(heads, P + H*W, n)`` for an ``H x W`` map, in ``dtype``.

        Without autograd (``no_grad`` / ``inference_mode``) they are cached per map size, dtype and device. An
        entry is keyed on the storage and version counter of every table (in-place updates such as optimizer steps
        and ``load_state_dict`` bump it), and the cache is emptied by every forward with autograd, by
        ``train()`` / ``eval()`` and by ``.to()``, which also covers updates that bypass the counter (fused
        optimizers). Only writes through ``.data`` with none of these in between need :meth:`clear_bias_cache`.
        """
        if not torch.jit.is_scripting():
            if torch.is_grad_enabled():
                if self._bias_cache:
                    self._bias_cache.clear()
            elif _cache_allowed(self.an_bias):
                return self._cached_biases(height, width, dtype)
        return self._build_biases(height, width, dtype)

    def _build_biases(self, height: int, width: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        agent = self._position_bias(self.an_bias, self.ah_bias, self.aw_bias, self.ac_bias, height, width)
        token = self._position_bias(self.na_bias, self.ha_bias, self.wa_bias, self.ca_bias, height, width)
        if self.agent_shape != (self.pool_size, self.pool_size):
            agent, token = self._resize_agents(agent), self._resize_agents(token)
        return agent.to(dtype), token.transpose(-1, -2).to(dtype)

    def _resize_agents(self, bias: torch.Tensor) -> torch.Tensor:
        """``(heads, s*s, L)`` -> ``(heads, ah*aw, L)``: bilinear along the agent grid (``align_corners=False``)."""
        heads, _, length = bias.shape
        grid = bias.reshape(heads, self.pool_size, self.pool_size, length).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=self.agent_shape, mode="bilinear", align_corners=False)
        return grid.flatten(2).transpose(1, 2)

    @torch.jit.unused
    def _cached_biases(self, height: int, width: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        tables = [t for t in (getattr(self, name) for name in AGENT_BIAS_NAMES) if t is not None]
        key = (height, width, dtype, tables[0].device, tuple((t.data_ptr(), t._version) for t in tables))
        biases = self._bias_cache.get(key)
        if biases is None:
            agent, token = self._build_biases(height, width, dtype)
            biases = agent, token.contiguous()
            if len(self._bias_cache) >= _CACHE_ENTRIES:
                self._bias_cache.clear()
            self._bias_cache[key] = biases
        return biases

    def clear_bias_cache(self) -> None:
        """Drop the cached inference-time position biases (see :meth:`_biases` for when this is needed)."""
        self._bias_cache.clear()

    def _apply(self, fn, recurse: bool = True):
        self._bias_cache.clear()  # .to() / .half() / .cuda() may reuse freed storage for new tables
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> AgentAttention:
        self._bias_cache.clear()
        return super().train(mode)

    def _attend(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``tokens``: ``(B, P + H*W, C)`` -> ``(B, P + H*W, C)``."""
        B, N, C = tokens.shape
        P = self.num_prefix_tokens
        h, d = self.num_heads, self.head_dim
        n = self.agent_shape[0] * self.agent_shape[1]
        # token-major (B, N, heads, d) views; unbinding the qkv axis in place keeps the backward to one stack
        q_t, k_t, v_t = self.qkv(tokens).view(B, N, 3, h, d).unbind(2)
        q, k, v = q_t.transpose(1, 2), k_t.transpose(1, 2), v_t.transpose(1, 2)  # (B, heads, N, d)

        # agents: the patch queries (all heads at once, channels-last view) average-pooled to an s x s grid,
        # pre-multiplied by the softmax scale -> (B, heads, n, d)
        agents = F.adaptive_avg_pool2d(self._patch_map(q_t, height, width), self.agent_shape)
        agents = agents.permute(0, 2, 3, 1).reshape(B, n, h, d).transpose(1, 2) * d**-0.5

        agent_bias, token_bias = self._biases(height, width, q.dtype)
        agent_v = self._drop(torch.softmax(agents @ k.transpose(-1, -2) + agent_bias, dim=-1)) @ v
        out = self._drop(torch.softmax(q @ agents.transpose(-1, -2) + token_bias, dim=-1)) @ agent_v
        out = out.transpose(1, 2).reshape(B, N, C)

        # + depthwise 3x3 conv of the patch values on their grid (prefix tokens get none)
        local = self.dwc(self._patch_map(v_t, height, width)).permute(0, 2, 3, 1)  # (B, H, W, C)
        if P == 0 and torch.is_grad_enabled():  # out of place: an in-place add to a view costs autograd copies
            out = out + local.reshape(B, N, C)
        else:
            out[:, P:].view(B, height, width, C).add_(local)
        if self.gate is not None:
            out = self.gate(tokens, out)
        return self.proj_drop(self.proj(out))

    def _patch_map(self, t: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Token-major ``(B, P + H*W, heads, d)`` -> the patch tokens as a ``(B, C, H, W)`` view (channels-last
        strides, no copy; the prefix slice is skipped when there is none, so autograd adds no zero-filled grad)."""
        if self.num_prefix_tokens:
            t = t[:, self.num_prefix_tokens :]
        return t.reshape(t.shape[0], height, width, -1).permute(0, 3, 1, 2)

    def _drop(self, attn: torch.Tensor) -> torch.Tensor:
        return F.dropout(attn, self.attn_drop) if self.training and self.attn_drop > 0 else attn

    def forward(
        self,
        x: torch.Tensor,
        feat_size: list[int] | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """``x``: a map ``(B, H, W, C)``, or tokens ``(B, P + H*W, C)`` with ``P = num_prefix_tokens`` leading
        (class) tokens and the patch grid ``feat_size = (H, W)`` (inferred when the grid is square). Returns the
        input's shape."""
        check_no_attn_mask(attn_mask, is_causal)
        if x.ndim == 4:
            if self.num_prefix_tokens > 0:
                raise ValueError("an AgentAttention with prefix tokens takes tokens (B, P + H*W, C) and feat_size")
            B, H, W, C = x.shape
            return self._attend(x.reshape(B, H * W, C), H, W).view(B, H, W, C)
        if x.ndim != 3:
            raise ValueError(f"x must be (B, H, W, C) or (B, N, C), got shape {list(x.shape)}")
        num_patches = x.shape[1] - self.num_prefix_tokens
        if feat_size is None:
            side = int(math.sqrt(num_patches) + 0.5)
            if side * side != num_patches:
                raise ValueError(f"feat_size is needed for {num_patches} patch tokens (not a square grid)")
            H, W = side, side
        else:
            H, W = feat_size[0], feat_size[1]
        if num_patches != H * W:
            raise ValueError(
                f"feat_size {H}x{W} does not match {num_patches} patch tokens "
                f"({x.shape[1]} tokens, {self.num_prefix_tokens} prefix)"
            )
        return self._attend(x, H, W)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, agent_num={self.agent_num}, agent_shape={self.agent_shape}, "
            f"grid_size={self.grid_size}, num_prefix_tokens={self.num_prefix_tokens}"
        )


def _to_agent_layout(name: str, value: torch.Tensor) -> torch.Tensor:
    """An official agent-bias tensor in :class:`AgentAttention`'s ``(heads, n, ...)`` layout.

    Official shapes: ``an/na (h, n, 7, 7)`` (unchanged), ``ah (1, h, n, G, 1)``, ``aw (1, h, n, 1, G)``,
    ``ha (1, h, G, 1, n)``, ``wa (1, h, 1, G, n)``, ``ac (1, h, n, 1)``, ``ca (1, h, 1, n)``. Tensors already in
    this module's layout (one axis fewer) are returned unchanged.
    """
    if name in ("ah_bias", "aw_bias") and value.ndim == 5:
        return value[0]
    if name in ("ha_bias", "wa_bias") and value.ndim == 5:
        return value[0].permute(0, 3, 1, 2)
    if name == "ac_bias" and value.ndim == 4:
        return value[0]
    if name == "ca_bias" and value.ndim == 4:
        return value[0].transpose(1, 2)
    return value


def resize_agent_bias(value: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Resample an agent-bias table ``(heads, n, *rest)`` to ``shape`` ``(heads, n', *rest')``.

    The agent axis is resampled on its ``sqrt(n) x sqrt(n)`` grid and the last two (spatial) axes of 4-D tables on
    theirs, both bilinearly with ``align_corners=False``; prefix-token axes (3-D tables) must match.
    """
    shape = tuple(shape)
    if tuple(value.shape) == shape:
        return value
    if value.ndim != len(shape) or value.shape[0] != shape[0]:
        raise ValueError(f"cannot resample an agent bias of shape {tuple(value.shape)} to {shape} (heads/rank differ)")
    heads, n, n_new = value.shape[0], value.shape[1], shape[1]
    s, s_new = math.isqrt(n), math.isqrt(n_new)
    if s * s != n or s_new * s_new != n_new:
        raise ValueError(f"agent counts must be perfect squares, got {n} -> {n_new}")
    if value.ndim == 3 and value.shape[2] != shape[2]:
        raise ValueError(f"prefix-token counts differ: {value.shape[2]} -> {shape[2]}")
    dtype = value.dtype
    value = value.float()
    if value.ndim == 4:
        value = _resize(value, shape[2], shape[3])
    if n != n_new:
        rest = value.shape[2:]
        grid = value.reshape(heads, s, s, -1).permute(0, 3, 1, 2)  # (heads, rest, s, s)
        grid = _resize(grid, s_new, s_new)
        value = grid.permute(0, 2, 3, 1).reshape(heads, n_new, *rest)
    return value.to(dtype)


def convert_agent_biases(
    state_dict: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Map every agent-bias entry of ``state_dict`` (official or this layout) onto the shape of the same key in
    ``target`` (a model's ``state_dict()``, meta tensors are fine), resampling grid sizes and agent counts."""
    out = {}
    for key, value in state_dict.items():
        name = key.rsplit(".", 1)[-1]
        if name in AGENT_BIAS_NAMES:
            value = _to_agent_layout(name, value)
            if key in target:
                value = resize_agent_bias(value, target[key].shape)
        out[key] = value
    return out
