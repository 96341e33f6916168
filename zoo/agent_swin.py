"""Agent-Swin: Swin-T/S/B with agent attention in the early stages (Han et al., ECCV 2024).

Swin's pyramid (4x4 patch embedding + LayerNorm, patch merging between stages, pre-norm blocks with MLP ratio 4,
LayerNorm eps 1e-5, final norm, average-pooled head) where each stage is typed by the official ``attn_type`` string:
``A`` = every block agent attention over the whole stage map, ``B`` = Swin (shifted) 7x7 window attention (the
shared ``"window"`` mixer, shift 3 on odd blocks), ``M`` = the first ``k`` blocks agent then window blocks, with ``k``
the suffix of the string. Published: T ``AAAB``, S ``AABB``, B ``AAMB2``; agents 9, 16, 49, 49 per stage.
Built from the shared :class:`HierarchicalVisionTransformer`, ``build_stages`` and ``TransformerBlock``; the agent
biases are interpolated to the actual map size, so any input size works. Training drop-path rates of the official
recipe: T 0.2, S 0.3, B 0.5 (default here 0, as in timm).

Higher-resolution releases: ``agent_swin_small_288`` and ``agent_swin_base_384`` (B fine-tuned from the 224 model for
30 epochs). Their official ``WINDOW_SIZE`` (72, 96 = the stage-1 map) gives window ``WINDOW_SIZE // 8`` = 9 and 12 to
the window blocks (so another relative-position table), a window covering a whole map is unshifted, as here.

Official downstream backbone (Agent-Attention ``downstream/detection/mmdet/models/backbones/agent_swin.py``, same in
``segmentation/``): ``downstream_agent_shapes=[(9, 9), (12, 12), (14, 14), (7, 7)]`` (81 / 144 / 196 agents, biases
resized at run time), ``out_norms=True`` (a LayerNorm on each stage output, official ``norm{i}``) and
``clamp_window=False`` (stage 4: 7x7 windows on the map zero-padded to a multiple of 7, padded tokens unmasked, the
second block shifted by 3 with the Swin region mask, whatever the map size).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from timm.layers import LayerNorm, PatchEmbed, resize_rel_pos_bias_table_levit
from timm.models import generate_default_cfgs, register_model

from attnzoo._agent_cfg import agent_cfg, check_agent_shapes
from attnzoo.layers import (
    AgentAttention,
    HierarchicalVisionTransformer,
    PatchMerging,
    TransformerBlock,
    WindowAttention2d,
    build_stages,
    convert_agent_biases,
)
from attnzoo.weights import build_model_with_official_weights, unwrap_state_dict
from attnzoo.weights.downstream import OUT_NORMS, add_new_output_norms

__all__ = ["AgentSwinTransformer", "block_types", "checkpoint_filter_fn"]


def block_types(attn_type: str, depths: Sequence[int]) -> list[list[str]]:
    """Per-block mixer kinds (``"agent"`` / ``"window"``) of every stage from an official ``attn_type`` string.

    One letter per stage (``A`` agent, ``B`` window, ``M`` mixed), then, if some stage is ``M``, the number of its
    leading agent blocks: ``"AAMB2"`` with depths (2, 2, 18, 2) gives stage 3 two agent and 16 window blocks.
    """
    num_stages = len(depths)
    letters, suffix = attn_type[:num_stages], attn_type[num_stages:]
    if len(letters) != num_stages or set(letters) - set("ABM") or ("M" in letters) != bool(suffix):
        raise ValueError(
            f"attn_type must have one of 'A', 'B', 'M' per stage ({num_stages}), followed by the number of agent "
            f"blocks when a stage is 'M', got {attn_type!r}"
        )
    if suffix and not suffix.isdigit():
        raise ValueError(f"attn_type suffix must be the number of agent blocks of the 'M' stages, got {suffix!r}")
    mixed = int(suffix) if suffix else 0
    kinds = []
    for letter, depth in zip(letters, depths):
        agent_blocks = {"A": depth, "B": 0, "M": mixed}[letter]
        kinds.append(["agent" if j < agent_blocks else "window" for j in range(depth)])
    return kinds


class AgentSwinTransformer(HierarchicalVisionTransformer):
    """Agent-Swin on the shared hierarchical backbone (``stem`` = Swin patch embedding, ``stages.i.downsample`` =
    patch merging before stage ``i``).

    Args:
        embed_dim: width of the first stage (doubled per stage).
        depths, num_heads: per-stage block counts and heads.
        attn_type: stage types, see :func:`block_types`.
        agent_num: agents per stage (perfect squares; unused by window-only stages).
        window_size: window of the window-attention blocks.
        img_size: training resolution; sets the reference grid of the agent biases.
        gate: optional output gate of every mixer (see :mod:`attnzoo.layers.gate`).
        downstream_agent_shapes: per stage, the run-time agent grid ``(ah, aw)`` of the agent blocks (official
            downstream backbones: ``[(9, 9), (12, 12), (14, 14), (7, 7)]``); entries of stages without agent blocks
            are ignored. ``None``: the ``sqrt(agent_num)`` grids of classification.
        out_norms: add a LayerNorm (eps 1e-5) on each stage output, applied to the maps ``forward_intermediates`` /
            ``features_only`` return and not fed to the next stage (official ``norm{i}``).
        clamp_window: ``True`` (classification): a window larger than the map is clamped to it and unshifted, padded
            tokens are masked. ``False``: the official downstream window blocks (windows of ``window_size`` on the
            map zero-padded to a multiple, padded tokens unmasked, odd blocks shifted by ``window_size // 2`` with the
            Swin region mask; see :class:`~attnzoo.layers.WindowAttention2d`).
    """

    # why `attnzoo export --dynamic-size` refuses it before tracing (weights.onnx_export.dynamic_size_refusal)
    dynamic_size_unsupported = (
        "the window padding, shifts and masks of its window-attention stages are computed from the concrete size"
    )

    def __init__(
        self,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        attn_type: str = "AAAB",
        agent_num: Sequence[int] = (9, 16, 49, 49),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        qkv_bias: bool = True,
        gate: str = "none",
        downstream_agent_shapes: Sequence[int | Sequence[int] | None] | None = None,
        out_norms: bool = False,
        clamp_window: bool = True,
        drop_path_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        device=None,
        dtype=None,
        **kwargs: Any,
    ) -> None:
        dd = {"device": device, "dtype": dtype}
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        num_stages = len(depths)
        if len(num_heads) != num_stages or len(agent_num) != num_stages:
            raise ValueError(f"num_heads and agent_num need one entry per stage ({num_stages})")
        agent_shapes = check_agent_shapes(downstream_agent_shapes, num_stages)
        dims = [embed_dim * 2**i for i in range(num_stages)]
        kinds = block_types(attn_type, depths)
        grids = [
            (math.ceil(img_size[0] / 2 ** (i + 2)), math.ceil(img_size[1] / 2 ** (i + 2))) for i in range(num_stages)
        ]
        norm_layer = partial(LayerNorm, eps=1e-5)
        common = dict(qkv_bias=qkv_bias, gate=gate, attn_drop=attn_drop_rate, proj_drop=proj_drop_rate, **dd)

        def make_block(i: int, j: int, drop_path: float) -> nn.Module:
            if kinds[i][j] == "agent":
                mixer = AgentAttention(
                    dims[i],
                    num_heads=num_heads[i],
                    agent_num=agent_num[i],
                    agent_shape=agent_shapes[i],
                    grid_size=grids[i],
                    **common,
                )
            else:
                mixer = WindowAttention2d(
                    dims[i],
                    num_heads=num_heads[i],
                    window_size=window_size,
                    shift_size=window_size // 2 if j % 2 else 0,
                    clamp_window=clamp_window,
                    padding="mask" if clamp_window else "zero",
                    **common,
                )
            return TransformerBlock(
                dims[i],
                mixer,
                mlp_ratio=mlp_ratio,
                drop_path=drop_path,
                proj_drop=proj_drop_rate,
                norm_layer=norm_layer,
                **dd,
            )

        def make_downsample(i: int) -> nn.Module | None:
            return PatchMerging(dims[i - 1], dims[i], norm_layer=norm_layer, **dd) if i else None

        stem = PatchEmbed(
            img_size=img_size,
            patch_size=4,
            in_chans=in_chans,
            embed_dim=embed_dim,
            norm_layer=norm_layer,
            output_fmt="NHWC",
            strict_img_size=False,
            dynamic_img_pad=True,
            **dd,
        )
        stages = build_stages(depths, make_block, make_downsample, drop_path_rate)
        super().__init__(
            stem,
            stages,
            dims,
            stem_stride=4,
            norm_layer=norm_layer,
            out_norm_layer=norm_layer if out_norms else None,
            in_chans=in_chans,
            **dd,
            **kwargs,
        )


_DROPPED = re.compile(r"(attn_mask|relative_position_index)$")
_OUT_NORM = re.compile(r"^norm(\d+)\.")


def checkpoint_filter_fn(
    state_dict: Mapping[str, Any], model: nn.Module, new_output_norms: bool = True
) -> dict[str, torch.Tensor]:
    """Official Agent-Swin checkpoint (plain or ``{"model": ...}``; classification or downstream backbone) -> this
    model's state dict.

    ``patch_embed`` -> ``stem``; ``layers.i.blocks`` -> ``stages.i.blocks``; ``layers.i.downsample`` (after stage
    ``i``) -> ``stages.{i+1}.downsample``; ``head`` -> ``head.fc``; the downstream output norms ``norm{i}`` ->
    ``out_norms.{i}``; the ``attn_mask`` / ``relative_position_index`` buffers are dropped (recomputed). Agent biases
    are resampled to the model's grid (another resolution) and agent count, relative-position tables bicubically to
    the model's window (e.g. a 224 checkpoint, window 7, into ``agent_swin_base_384``, window 12, as the official
    fine-tuning does). ``new_output_norms``: a model with output norms gets its own (untrained) ones when the
    checkpoint has none (:func:`~attnzoo.weights.downstream.add_new_output_norms`).
    """
    state = unwrap_state_dict(state_dict)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if _DROPPED.search(key):
            continue
        if key.startswith("patch_embed."):
            key = "stem." + key[len("patch_embed.") :]
        elif key.startswith("layers."):
            _, stage, part, rest = key.split(".", 3)
            if part == "downsample":
                key = f"stages.{int(stage) + 1}.downsample.{rest}"
            else:
                key = f"stages.{stage}.{part}.{rest}"
        elif key.startswith("head.") and not key.startswith("head.fc."):
            key = "head.fc." + key[len("head.") :]
        elif _OUT_NORM.match(key):
            key = _OUT_NORM.sub(lambda m: f"{OUT_NORMS}{m.group(1)}.", key)
        out[key] = value
    target = model.state_dict()
    for key in [k for k in out if k.endswith("relative_position_bias_table") and k in target]:
        if out[key].shape != target[key].shape and out[key].shape[1] == target[key].shape[1]:  # same heads
            out[key] = resize_rel_pos_bias_table_levit(out[key], target[key].shape, antialias=False)
    out = convert_agent_biases(out, target)
    return add_new_output_norms(out, model) if new_output_norms else out


def _create_agent_swin(variant: str, pretrained: bool = False, **kwargs: Any) -> AgentSwinTransformer:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_official_weights(
        AgentSwinTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


default_cfgs = generate_default_cfgs(
    {
        "agent_swin_tiny.in1k": agent_cfg(url="https://cloud.tsinghua.edu.cn/f/a2ddc1190c224f768a41/?dl=1"),
        "agent_swin_small.in1k": agent_cfg(url="https://cloud.tsinghua.edu.cn/f/f607172c9fea4d6e99bb/?dl=1"),
        "agent_swin_base.in1k": agent_cfg(url="https://cloud.tsinghua.edu.cn/f/4fcd2d0114bb490483c3/?dl=1"),
        "agent_swin_small_288.in1k": agent_cfg(
            url="https://cloud.tsinghua.edu.cn/f/09760394e93b4046a25e/?dl=1",
            input_size=(3, 288, 288),
            pool_size=(9, 9),
            crop_pct=1.0,
        ),
        "agent_swin_base_384.in1k": agent_cfg(
            url="https://cloud.tsinghua.edu.cn/f/bb84ee9058954706a557/?dl=1",
            input_size=(3, 384, 384),
            pool_size=(12, 12),
            crop_pct=1.0,
        ),
    }
)


@register_model
def agent_swin_tiny(pretrained: bool = False, **kwargs: Any) -> AgentSwinTransformer:
    """Agent-Swin-T (96 wide, depths 2-2-6-2, stages AAAB): 29M params, 82.6 top-1."""
    model_args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), attn_type="AAAB")
    return _create_agent_swin("agent_swin_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_swin_small(pretrained: bool = False, **kwargs: Any) -> AgentSwinTransformer:
    """Agent-Swin-S (96 wide, depths 2-2-18-2, stages AABB): 50M params, 83.7 top-1."""
    model_args = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), attn_type="AABB")
    return _create_agent_swin("agent_swin_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_swin_base(pretrained: bool = False, **kwargs: Any) -> AgentSwinTransformer:
    """Agent-Swin-B (128 wide, depths 2-2-18-2, stages AAMB2: two agent blocks in stage 3): 88M params, 84.0 top-1."""
    model_args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), attn_type="AAMB2")
    return _create_agent_swin("agent_swin_base", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_swin_small_288(pretrained: bool = False, **kwargs: Any) -> AgentSwinTransformer:
    """Agent-Swin-S trained at 288 (stages AABB, window 9): 50M params, 14.6G FLOPs, 84.1 top-1."""
    model_args = dict(
        embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), attn_type="AABB", window_size=9, img_size=288
    )
    return _create_agent_swin("agent_swin_small_288", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_swin_base_384(pretrained: bool = False, **kwargs: Any) -> AgentSwinTransformer:
    """Agent-Swin-B fine-tuned at 384 (stages AAMB2, window 12): 88M params, 46.3G FLOPs, 84.9 top-1."""
    model_args = dict(
        embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), attn_type="AAMB2", window_size=12, img_size=384
    )
    return _create_agent_swin("agent_swin_base_384", pretrained=pretrained, **dict(model_args, **kwargs))
