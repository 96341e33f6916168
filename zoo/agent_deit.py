"""Agent-DeiT: DeiT-T/S/B with agent attention (Han et al., ECCV 2024).

timm's ``VisionTransformer`` (its keys, ``pos_embed`` resampling, ``dynamic_img_size``, heads and feature API) with
blocks from attnzoo's ``TransformerBlock`` and :class:`attnzoo.layers.AgentAttention` (one class token, excluded from
the agent pooling and the DWC, with its own ``ac_bias``/``ca_bias``). The first ``agent_layers`` blocks use agent
attention, the rest plain attention. Published configs: T/S 49 agents in all 12 blocks, B 81 agents in the first 4.

The agent mixer needs the patch grid of the token sequence, so :class:`AgentVisionTransformer` passes ``(H, W)`` to
every block (``forward_features`` / ``forward_intermediates``); any input size works, the biases are interpolated.
``agent_deit_small_448`` is the official Agent-DeiT-S trained at 448 (same blocks; position embedding and agent
biases laid out for the 28x28 grid). Training drop-path rates of the official recipe: T 0.0, S 0.1 (also at 448),
B 0.3 (default here 0, as in timm).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from timm.layers import LayerNorm, Mlp
from timm.models import generate_default_cfgs, register_model
from timm.models._manipulate import checkpoint
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn

from attnzoo._agent_cfg import agent_cfg
from attnzoo.layers import (
    AgentAttention,
    Attention,
    TransformerBlock,
    ZooVisionTransformer,
    convert_agent_biases,
    vit_forward_intermediates,
)
from attnzoo.weights import build_model_with_official_weights, unwrap_state_dict

__all__ = ["AgentVisionTransformer", "agent_vit_block", "checkpoint_filter_fn"]


def agent_vit_block(
    dim: int,
    num_heads: int,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    qk_norm: bool = False,
    scale_attn_norm: bool = False,
    scale_mlp_norm: bool = False,
    proj_bias: bool = True,
    init_values: float | None = None,
    proj_drop: float = 0.0,
    attn_drop: float = 0.0,
    drop_path: float = 0.0,
    norm_layer: type[nn.Module] = LayerNorm,
    act_layer: type[nn.Module] = nn.GELU,
    mlp_layer: type[nn.Module] = Mlp,
    attn_layer: object = None,
    depth: int = 0,
    agent_num: int = 49,
    agent_layers: int = 12,
    grid_size: tuple[int, int] = (14, 14),
    num_prefix_tokens: int = 1,
    gate: str = "none",
    device=None,
    dtype=None,
) -> TransformerBlock:
    """One block for ``VisionTransformer(block_fn=...)``: agent attention when ``depth`` (the block index timm
    passes) is below ``agent_layers``, plain attention otherwise. ``attn_layer`` is accepted and unused."""
    if qk_norm or scale_attn_norm or scale_mlp_norm:
        raise ValueError("qk_norm, scale_attn_norm and scale_mlp_norm are not supported by Agent-DeiT blocks")
    dd = {"device": device, "dtype": dtype}
    common = dict(num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, gate=gate, **dd)
    if depth < agent_layers:
        mixer = AgentAttention(
            dim,
            agent_num=agent_num,
            grid_size=grid_size,
            num_prefix_tokens=num_prefix_tokens,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            **common,
        )
    else:
        mixer = Attention(dim, attn_drop=attn_drop, proj_drop=proj_drop, norm_layer=norm_layer, **common)
    return TransformerBlock(
        dim,
        mixer,
        mlp_ratio=mlp_ratio,
        drop_path=drop_path,
        layer_scale_init_value=init_values,
        proj_drop=proj_drop,
        mlp_bias=proj_bias,
        norm_layer=norm_layer,
        act_layer=act_layer,
        mlp_layer=mlp_layer,
        **dd,
    )


class AgentVisionTransformer(ZooVisionTransformer):
    """timm ``VisionTransformer`` (the zoo's, :class:`~attnzoo.layers.ZooVisionTransformer`) whose blocks receive
    the patch grid: ``block(x, feat_size=[H, W])``.

    Attention masks and patch dropout are not supported (agents are pooled on the full patch grid).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("patch_drop_rate", 0.0):
            raise ValueError("patch_drop_rate must be 0 for Agent-DeiT (agent attention needs the full patch grid)")
        super().__init__(*args, **kwargs)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Image -> ``(B, P + H*W, C)`` tokens (position embedding added) and the patch grid ``[H, W]``."""
        x = self.patch_embed(x)
        if x.ndim == 4:  # dynamic_img_size: (B, H, W, C)
            feat_size = [x.shape[1], x.shape[2]]
        else:
            feat_size = [self.patch_embed.grid_size[0], self.patch_embed.grid_size[1]]
        x = self._pos_embed(x)
        return self.norm_pre(self.patch_drop(x)), feat_size

    def _run_blocks(
        self, x: torch.Tensor, blocks: nn.Module, take_indices: Sequence[int], norm: bool, feat_size: list[int]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``blocks`` on tokens ``x`` of the patch grid ``feat_size``; the outputs of the blocks in
        ``take_indices`` (normed if ``norm``) are collected (see :data:`attnzoo.layers.BlockLoop`)."""
        intermediates = []
        for i, blk in enumerate(blocks):
            x = checkpoint(blk, x, feat_size) if self.grad_checkpointing else blk(x, feat_size)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        return x, intermediates

    def forward_features(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        """``(B, C, H, W)`` image -> ``(B, P + ceil(H/16) * ceil(W/16), embed_dim)`` normed tokens."""
        if attn_mask is not None or is_causal:
            raise ValueError("attn_mask / is_causal are not supported by Agent-DeiT")
        x, feat_size = self._embed(x)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, feat_size)
            else:
                x = blk(x, feat_size)
        return self.norm(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]] | dict[str, Any]:
        """Block outputs (``indices``: last n if int, all if None) as NCHW maps or NLC tokens, as timm's ViT."""
        if attn_mask is not None or is_causal:
            raise ValueError("attn_mask / is_causal are not supported by Agent-DeiT")
        return vit_forward_intermediates(
            self,
            x,
            self._run_blocks,
            indices,
            return_prefix_tokens=return_prefix_tokens,
            norm=norm,
            stop_early=stop_early,
            output_fmt=output_fmt,
            intermediates_only=intermediates_only,
            output_dict=output_dict,
        )


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: VisionTransformer) -> dict[str, torch.Tensor]:
    """Official Agent-DeiT checkpoint (plain or ``{"model": ...}``) -> this model's state dict.

    Keys are timm ViT keys already; agent biases are moved to :class:`AgentAttention`'s layout and resampled to the
    model's grid (another resolution) and agent count; ``pos_embed`` is resampled by timm's ViT filter.
    """
    state = convert_agent_biases(unwrap_state_dict(state_dict), model.state_dict())
    return vit_checkpoint_filter_fn(state, model)


def _create_agent_deit(variant: str, pretrained: bool = False, **kwargs: Any) -> AgentVisionTransformer:
    out_indices = kwargs.pop("out_indices", 3)
    kwargs.setdefault("dynamic_img_size", True)
    kwargs.setdefault("dynamic_img_pad", True)
    img_size = kwargs.get("img_size", 224)
    img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    patch_size = kwargs.get("patch_size", 16)
    block_args = dict(
        agent_num=kwargs.pop("agent_num", 49),
        agent_layers=kwargs.pop("agent_layers", kwargs.get("depth", 12)),
        grid_size=(img_size[0] // patch_size, img_size[1] // patch_size),
        num_prefix_tokens=int(kwargs.get("class_token", True)) + kwargs.get("reg_tokens", 0),
        gate=kwargs.pop("gate", "none"),
    )
    return build_model_with_official_weights(
        AgentVisionTransformer,
        variant,
        pretrained,
        block_fn=partial(agent_vit_block, **block_args),
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return agent_cfg(url, pool_size=None, first_conv="patch_embed.proj", classifier="head", **kwargs)


default_cfgs = generate_default_cfgs(
    {
        "agent_deit_tiny.in1k": _cfg(url="https://cloud.tsinghua.edu.cn/f/57e0904221824ee7b7af/?dl=1"),
        "agent_deit_small.in1k": _cfg(url="https://cloud.tsinghua.edu.cn/f/fdd43304372541db8ea7/?dl=1"),
        "agent_deit_base.in1k": _cfg(url="https://cloud.tsinghua.edu.cn/f/5115f15fdd7e4ab58fbc/?dl=1"),
        "agent_deit_small_448.in1k": _cfg(
            url="https://cloud.tsinghua.edu.cn/f/a228f86241c445f1969b/?dl=1", input_size=(3, 448, 448)
        ),
    }
)


@register_model
def agent_deit_tiny(pretrained: bool = False, **kwargs: Any) -> AgentVisionTransformer:
    """Agent-DeiT-T (192 wide, 12 blocks, 3 heads; 49 agents in every block): 6.0M params, 74.9 top-1."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, agent_num=49)
    return _create_agent_deit("agent_deit_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_deit_small(pretrained: bool = False, **kwargs: Any) -> AgentVisionTransformer:
    """Agent-DeiT-S (384 wide, 12 blocks, 6 heads; 49 agents in every block): 22.7M params, 80.5 top-1."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, agent_num=49)
    return _create_agent_deit("agent_deit_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_deit_base(pretrained: bool = False, **kwargs: Any) -> AgentVisionTransformer:
    """Agent-DeiT-B (768 wide, 12 blocks, 12 heads; 81 agents in the first 4 blocks, plain attention after):
    87.2M params, 82.0 top-1."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, agent_num=81, agent_layers=4)
    return _create_agent_deit("agent_deit_base", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_deit_small_448(pretrained: bool = False, **kwargs: Any) -> AgentVisionTransformer:
    """Agent-DeiT-S trained at 448 (the Agent-DeiT-S blocks on a 28x28 patch grid): 23.1M params, 17.7G FLOPs,
    83.1 top-1."""
    model_args = dict(img_size=448, patch_size=16, embed_dim=384, depth=12, num_heads=6, agent_num=49)
    return _create_agent_deit("agent_deit_small_448", pretrained=pretrained, **dict(model_args, **kwargs))
