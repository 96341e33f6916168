"""Agent-PVT: PVT-T/S/M/L with agent attention in every block (Han et al., ECCV 2024).

The pyramid of PVT v1 (Wang et al., 2021): stage ``i`` starts with a non-overlapping patch embedding (4x4 conv for
the stem, 2x2 stride-2 convs between stages, each followed by a LayerNorm) and a learned per-stage position
embedding, then runs pre-norm blocks (LayerNorm eps 1e-6, MLP ratios 8, 8, 4, 4). Every block uses agent attention on
the whole stage map without spatial reduction (agents 9, 16, 49, 49 per stage); there is no final norm, the head
averages the last map. Built from the shared :class:`HierarchicalVisionTransformer`, ``build_stages`` and
``TransformerBlock``; position embeddings and agent biases are interpolated to the actual map size, so any input size
works. ``agent_pvt_medium_256`` is the official Agent-PVT-M trained at 256 (same blocks; position embeddings and
agent biases laid out for the 64 / 32 / 16 / 8 grids). Training drop-path rates of the official recipe: T/S 0.1, M/L
0.3 (M also at 256; default here 0, as in timm).

Official downstream backbone (Agent-Attention ``downstream/detection/mmdet/models/backbones/agent_pvt.py``, same in
``segmentation/``): ``downstream_agent_shapes=[(12, 12), (16, 16), (28, 28), (28, 28)]`` (144 / 256 / 784 / 784
agents, biases resized at run time) and ``pad_patches=False`` (the strided patch convolutions drop the rows / columns
that do not fill a patch, as the official code); position embeddings are resized bilinearly to every map; no output
norms.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm, trunc_normal_
from timm.models import generate_default_cfgs, register_model

from attnzoo._agent_cfg import agent_cfg, check_agent_shapes
from attnzoo.layers import (
    AgentAttention,
    HierarchicalVisionTransformer,
    TransformerBlock,
    build_stages,
    convert_agent_biases,
)
from attnzoo.weights import build_model_with_official_weights, unwrap_state_dict

__all__ = ["AgentPyramidVisionTransformer", "PatchEmbedWithPos", "checkpoint_filter_fn"]


class PatchEmbedWithPos(nn.Module):
    """Non-overlapping ``patch_size`` patch embedding + LayerNorm + learned position embedding.

    Input: an image ``(B, C, H, W)`` (``channels_last_input=False``) or a channels-last map ``(B, H, W, C)``; with
    ``pad=True`` the input is zero-padded at the right/bottom to a multiple of ``patch_size`` (``H' = ceil(H / p)``),
    with ``pad=False`` the rows / columns that do not fill a patch are dropped (``H' = H // p``, the official code).
    Output ``(B, H', W', embed_dim)``.
    ``pos_embed`` ``(1, Gh, Gw, embed_dim)`` is laid out for the reference grid ``grid_size`` and bilinearly
    interpolated to other map sizes.
    """

    def __init__(
        self,
        in_chans: int,
        embed_dim: int,
        patch_size: int,
        grid_size: tuple[int, int],
        channels_last_input: bool = False,
        pad: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.patch_size = patch_size
        self.channels_last_input = channels_last_input
        self.pad = pad
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size, **dd)
        self.norm = LayerNorm(embed_dim, eps=1e-5, **dd)
        self.pos_embed = nn.Parameter(torch.empty(1, grid_size[0], grid_size[1], embed_dim, **dd))
        trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last_input:
            x = x.permute(0, 3, 1, 2)
        if self.pad:
            pad_h, pad_w = (-x.shape[-2]) % self.patch_size, (-x.shape[-1]) % self.patch_size
            if pad_h > 0 or pad_w > 0:
                x = F.pad(x, (0, pad_w, 0, pad_h))
        elif x.shape[-2] < self.patch_size or x.shape[-1] < self.patch_size:
            raise ValueError(
                f"a {x.shape[-2]}x{x.shape[-1]} input is smaller than the patch size {self.patch_size} "
                "(pad_patches=False drops what does not fill a patch)"
            )
        x = self.norm(self.proj(x).permute(0, 2, 3, 1))
        H, W = x.shape[1], x.shape[2]
        pos = self.pos_embed
        # traced: always resize (exact at the same size), so one compiled graph serves every input size
        if torch.compiler.is_compiling() or pos.shape[1] != H or pos.shape[2] != W:
            pos = F.interpolate(pos.permute(0, 3, 1, 2), size=(H, W), mode="bilinear", align_corners=False)
            pos = pos.permute(0, 2, 3, 1)
        return x + pos.to(x.dtype)


class AgentPyramidVisionTransformer(HierarchicalVisionTransformer):
    """Agent-PVT on the shared hierarchical backbone (``stem`` = stage-1 patch embedding, ``stages.i.downsample`` =
    patch embedding of stage ``i + 1``).

    Args:
        embed_dims, depths, num_heads, mlp_ratios: per-stage widths, block counts, heads and MLP ratios.
        agent_num: agents per stage (perfect squares).
        img_size: training resolution; sets the reference grid of position embeddings and agent biases.
        gate: optional output gate of the agent mixers (see :mod:`attnzoo.layers.gate`).
        downstream_agent_shapes: per stage, the run-time agent grid ``(ah, aw)`` (official downstream backbones:
            ``[(12, 12), (16, 16), (28, 28), (28, 28)]``); ``None``: the ``sqrt(agent_num)`` grids of classification.
        pad_patches: ``True``: patch embeddings zero-pad their input to a multiple of the patch size; ``False``: they
            drop the remainder as the official code (see :class:`PatchEmbedWithPos`).
    """

    def __init__(
        self,
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        agent_num: Sequence[int] = (9, 16, 49, 49),
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        qkv_bias: bool = True,
        gate: str = "none",
        downstream_agent_shapes: Sequence[int | Sequence[int] | None] | None = None,
        pad_patches: bool = True,
        drop_path_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        device=None,
        dtype=None,
        **kwargs: Any,
    ) -> None:
        dd = {"device": device, "dtype": dtype}
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        for name, values in (("num_heads", num_heads), ("mlp_ratios", mlp_ratios), ("agent_num", agent_num)):
            if len(values) != len(embed_dims):
                raise ValueError(f"{name} needs one entry per stage ({len(embed_dims)}), got {list(values)}")
        agent_shapes = check_agent_shapes(downstream_agent_shapes, len(embed_dims))
        grids = [
            (math.ceil(img_size[0] / 2 ** (i + 2)), math.ceil(img_size[1] / 2 ** (i + 2)))
            for i in range(len(embed_dims))
        ]

        def make_block(i: int, j: int, drop_path: float) -> nn.Module:
            mixer = AgentAttention(
                embed_dims[i],
                num_heads=num_heads[i],
                agent_num=agent_num[i],
                agent_shape=agent_shapes[i],
                grid_size=grids[i],
                qkv_bias=qkv_bias,
                gate=gate,
                attn_drop=attn_drop_rate,
                proj_drop=proj_drop_rate,
                **dd,
            )
            return TransformerBlock(
                embed_dims[i],
                mixer,
                mlp_ratio=mlp_ratios[i],
                drop_path=drop_path,
                proj_drop=proj_drop_rate,
                norm_layer=partial(LayerNorm, eps=1e-6),
                **dd,
            )

        def make_downsample(i: int) -> nn.Module | None:
            if i == 0:
                return None
            return PatchEmbedWithPos(
                embed_dims[i - 1], embed_dims[i], 2, grids[i], channels_last_input=True, pad=pad_patches, **dd
            )

        stem = PatchEmbedWithPos(in_chans, embed_dims[0], 4, grids[0], pad=pad_patches, **dd)
        stages = build_stages(depths, make_block, make_downsample, drop_path_rate)
        super().__init__(stem, stages, embed_dims, stem_stride=4, norm_layer=None, in_chans=in_chans, **dd, **kwargs)


_STAGE_KEY = re.compile(r"^(patch_embed|pos_embed|block)(\d)(.*)$")


def _resize_pos_embed(value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Official ``(1, N, C)`` (square grid) or ``(1, H, W, C)`` position embedding -> ``shape`` ``(1, H', W', C)``."""
    if value.ndim == 3:
        side = math.isqrt(value.shape[1])
        if side * side != value.shape[1]:
            raise ValueError(f"official pos_embed with {value.shape[1]} positions is not a square grid")
        value = value.reshape(1, side, side, value.shape[-1])
    if value.shape[1:3] != shape[1:3]:
        grid = F.interpolate(value.permute(0, 3, 1, 2).float(), size=tuple(shape[1:3]), mode="bilinear")
        value = grid.permute(0, 2, 3, 1).to(value.dtype)
    return value


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """Official Agent-PVT checkpoint (plain or ``{"model": ...}``) -> this model's state dict.

    ``patch_embed{i}`` / ``pos_embed{i}`` -> ``stem`` (i = 1) or ``stages.{i-1}.downsample``; ``block{i}.{j}`` ->
    ``stages.{i-1}.blocks.{j}`` with ``attn.q`` and ``attn.kv`` fused into ``attn.qkv``; ``head`` -> ``head.fc``.
    Position embeddings and agent biases are resampled to the model's grid (another resolution) and agent count.
    """
    state = unwrap_state_dict(state_dict)
    if any(k.startswith("stages.") for k in state):  # already this layout
        return convert_agent_biases(state, model.state_dict())
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _STAGE_KEY.match(key)
        if match:
            kind, stage, rest = match.group(1), int(match.group(2)) - 1, match.group(3)
            if kind == "block":
                key = f"stages.{stage}.blocks{rest}"
            else:
                prefix = "stem" if stage == 0 else f"stages.{stage}.downsample"
                key = f"{prefix}.pos_embed" if kind == "pos_embed" else prefix + rest
        elif key.startswith("head."):
            key = "head.fc." + key[len("head.") :]
        out[key] = value
    for key in [k for k in out if re.search(r"\.attn\.q\.(weight|bias)$", k)]:
        kv_key = key.replace(".attn.q.", ".attn.kv.")
        out[key.replace(".attn.q.", ".attn.qkv.")] = torch.cat([out.pop(key), out.pop(kv_key)], dim=0)
    target = model.state_dict()
    for key in [k for k in out if k.endswith("pos_embed") and k in target]:
        out[key] = _resize_pos_embed(out[key], target[key].shape)
    return convert_agent_biases(out, target)


def _create_agent_pvt(variant: str, pretrained: bool = False, **kwargs: Any) -> AgentPyramidVisionTransformer:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_official_weights(
        AgentPyramidVisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


default_cfgs = generate_default_cfgs(
    {
        "agent_pvt_tiny.in1k": agent_cfg(url="https://cloud.tsinghua.edu.cn/f/13fdf0e0a7c5498c934f/?dl=1"),
        "agent_pvt_small.in1k": agent_cfg(url="https://cloud.tsinghua.edu.cn/f/36b8be9a8863456685a3/?dl=1"),
        "agent_pvt_medium.in1k": agent_cfg(url="https://cloud.tsinghua.edu.cn/f/4d00ecacf18b45f9b88c/?dl=1"),
        "agent_pvt_large.in1k": agent_cfg(url="https://cloud.tsinghua.edu.cn/f/040cfe0cfbbe4762ad09/?dl=1"),
        "agent_pvt_medium_256.in1k": agent_cfg(
            url="https://cloud.tsinghua.edu.cn/f/654df734121643b19c52/?dl=1", input_size=(3, 256, 256), pool_size=(8, 8)
        ),
    }
)


@register_model
def agent_pvt_tiny(pretrained: bool = False, **kwargs: Any) -> AgentPyramidVisionTransformer:
    """Agent-PVT-T (depths 2-2-2-2): 11.6M params, 78.4 top-1."""
    return _create_agent_pvt("agent_pvt_tiny", pretrained=pretrained, **dict(dict(depths=(2, 2, 2, 2)), **kwargs))


@register_model
def agent_pvt_small(pretrained: bool = False, **kwargs: Any) -> AgentPyramidVisionTransformer:
    """Agent-PVT-S (depths 3-4-6-3): 20.6M params, 82.2 top-1."""
    return _create_agent_pvt("agent_pvt_small", pretrained=pretrained, **dict(dict(depths=(3, 4, 6, 3)), **kwargs))


@register_model
def agent_pvt_medium(pretrained: bool = False, **kwargs: Any) -> AgentPyramidVisionTransformer:
    """Agent-PVT-M (depths 3-4-18-3): 35.9M params, 83.4 top-1."""
    return _create_agent_pvt("agent_pvt_medium", pretrained=pretrained, **dict(dict(depths=(3, 4, 18, 3)), **kwargs))


@register_model
def agent_pvt_large(pretrained: bool = False, **kwargs: Any) -> AgentPyramidVisionTransformer:
    """Agent-PVT-L (depths 3-8-27-3): 48.7M params, 83.7 top-1."""
    return _create_agent_pvt("agent_pvt_large", pretrained=pretrained, **dict(dict(depths=(3, 8, 27, 3)), **kwargs))


@register_model
def agent_pvt_medium_256(pretrained: bool = False, **kwargs: Any) -> AgentPyramidVisionTransformer:
    """Agent-PVT-M trained at 256 (depths 3-4-18-3): 36.1M params, 9.2G FLOPs, 83.8 top-1."""
    model_args = dict(depths=(3, 4, 18, 3), img_size=256)
    return _create_agent_pvt("agent_pvt_medium_256", pretrained=pretrained, **dict(model_args, **kwargs))
