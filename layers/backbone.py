"""Hierarchical (multi-stage) channels-last backbone with the full timm model API.

``stem -> stages[0..n-1] -> norm -> head``; stage ``i`` optionally downsamples, then runs its blocks. Every family with
a pyramid of feature maps (NAT, DiNAT, BiFormer, Agent-PVT/Swin, ...) is this class with its own stem, blocks and
downsampling, built with :func:`build_stages`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
from timm.layers import (
    ClassifierHead,
    LayerNorm,
    calculate_drop_path_rates,
    get_device_dtype,
    trunc_normal_,
)
from timm.models import checkpoint_seq
from timm.models._features import feature_take_indices

from .pool_head import ATTENTION_POOL_TYPES, AttentionPoolClassifierHead

BlockFactory = Callable[[int, int, float], nn.Module]
"""``make_block(stage_index, block_index, drop_path) -> block``."""
DownsampleFactory = Callable[[int], "nn.Module | None"]
"""``make_downsample(stage_index) -> module or None`` (None: the stage keeps its input resolution and width)."""


class Stage(nn.Module):
    """Optional downsampling followed by a sequence of blocks, channels-last ``(B, H, W, C)``."""

    def __init__(self, blocks: Sequence[nn.Module], downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


def build_stages(
    depths: Sequence[int],
    make_block: BlockFactory,
    make_downsample: DownsampleFactory,
    drop_path_rate: float = 0.0,
) -> list[Stage]:
    """Build ``len(depths)`` stages; drop-path rates rise linearly from 0 to ``drop_path_rate`` over all blocks."""
    rates = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=False)
    stages, offset = [], 0
    for stage_index, depth in enumerate(depths):
        blocks = [make_block(stage_index, j, rates[offset + j]) for j in range(depth)]
        stages.append(Stage(blocks, make_downsample(stage_index)))
        offset += depth
    return stages


class HierarchicalVisionTransformer(nn.Module):
    """Multi-stage vision transformer on channels-last maps.

    Args:
        stem: image ``(B, in_chans, H, W)`` -> ``(B, H / stem_stride, W / stem_stride, dims[0])``.
        stages: stage modules; stage ``i`` outputs ``dims[i]`` channels.
        dims: output width of each stage.
        stem_stride: total stride of the stem.
        stage_strides: stride of each stage's downsampling (default: 1 for the first stage, 2 after).
        norm_layer: final channels-last norm on the last stage (``None``: no final norm).
        out_norm_layer: one channels-last norm per stage output (``out_norms.{i}``), applied to the maps that
            ``forward_intermediates`` / ``features_only`` return, never to the input of the next stage (the output
            norms of the official detection / segmentation backbones; ``None``: none).
        num_classes, global_pool, drop_rate: classifier head (timm ``ClassifierHead`` on NHWC maps;
            ``global_pool="simpool"`` / ``"ep"``: SimPool / efficient-probing attention pooling,
            :class:`attnzoo.layers.AttentionPoolClassifierHead`);
            ``reset_classifier`` switches between all of them.

    ``forward_features`` returns an NHWC map (``output_fmt = "NHWC"``); ``forward_intermediates`` returns stage
    outputs in NCHW (default) or NHWC.
    """

    output_fmt = "NHWC"

    def __init__(
        self,
        stem: nn.Module,
        stages: Sequence[nn.Module],
        dims: Sequence[int],
        stem_stride: int = 4,
        stage_strides: Sequence[int] | None = None,
        norm_layer: Callable[..., nn.Module] | None = LayerNorm,
        out_norm_layer: Callable[..., nn.Module] | None = None,
        num_classes: int = 1000,
        global_pool: str = "avg",
        in_chans: int = 3,
        drop_rate: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if len(stages) != len(dims):
            raise ValueError(f"got {len(stages)} stages but {len(dims)} dims")
        stage_strides = stage_strides or [1] + [2] * (len(dims) - 1)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = dims[-1]
        self.stem = stem
        self.stages = nn.Sequential(*stages)
        reduction, self.feature_info = stem_stride, []
        for i, (dim, stride) in enumerate(zip(dims, stage_strides)):
            reduction *= stride
            self.feature_info.append(dict(num_chs=dim, reduction=reduction, module=f"stages.{i}"))
        self.norm = norm_layer(self.num_features, **dd) if norm_layer is not None else nn.Identity()
        self.out_norms = nn.ModuleList([out_norm_layer(dim, **dd) for dim in dims] if out_norm_layer else [])
        head_layer = AttentionPoolClassifierHead if global_pool in ATTENTION_POOL_TYPES else ClassifierHead
        self.head = head_layer(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, input_fmt="NHWC", **dd
        )
        self.apply(self._init_linear)

    @staticmethod
    def _init_linear(module: nn.Module) -> None:
        # meta tensors hold no values: skip the (slow, value-free) initialisation of models built on the meta device
        if isinstance(module, nn.Linear) and module.weight.device.type != "meta":
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters that mixers declare exempt from weight decay (position-bias tables, ...)."""
        names = set()
        for prefix, module in self.named_modules():
            if module is not self and hasattr(module, "no_weight_decay"):
                names.update(f"{prefix}.{n}" for n in module.no_weight_decay())
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise lr decay: stem, then each stage (coarse) or each block."""
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
                (r"^out_norms", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool in ATTENTION_POOL_TYPES and not isinstance(self.head, AttentionPoolClassifierHead):
            self.head = AttentionPoolClassifierHead(
                self.num_features,
                num_classes,
                pool_type=global_pool,
                drop_rate=self.drop_rate,
                input_fmt="NHWC",
                **get_device_dtype(self),
            ).train(self.training)
        self.head.reset(num_classes, pool_type=global_pool, in_features=self.num_features, **get_device_dtype(self))
        self.head_hidden_size = self.head.num_features
        if global_pool is not None:
            self.global_pool = global_pool

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (``indices``: last n if int, all if None) and, unless ``intermediates_only``, the final
        features. ``norm`` applies the final norm to the last stage's intermediate; a model with output norms
        (``out_norms``) passes every intermediate through its stage's output norm instead (``norm`` must be False)."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        out_norms = len(self.out_norms) > 0
        if norm and out_norms:
            raise ValueError("norm=True applies the classification norm; this model has output norms (out_norms)")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[: max_index + 1]
        intermediates = []
        x = self.stem(x)
        i = 0
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                x_inter = self.out_norms[i](x) if out_norms else self.norm(x) if norm and i == last else x
                intermediates.append(x_inter.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else x_inter)
        if intermediates_only:
            return intermediates
        if i == last:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages (and output norms) after the last of ``indices`` (and the norm / head); returns the kept
        indices."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        self.stages = self.stages[: max_index + 1]
        if len(self.out_norms):
            self.out_norms = self.out_norms[: max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` -> ``(B, H / r, W / r, num_features)``."""
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
