"""Plain ViT with gated attention (DeiT configs).

Output gate of Qiu et al., 2025 ("Gated Attention for Large Language Models", G1 position) on DeiT-T/S/B
(Touvron et al., 2021): every block's attention output is multiplied by ``sigmoid(x W_g)`` (per element by default,
``gate="headwise"`` for one gate per head, ``gate="none"`` for a plain DeiT) before the output projection.

The model is timm's ``VisionTransformer`` (so it has its whole API: ``forward_intermediates``, ``features_only``,
``dynamic_img_size``, position-embedding resampling, timm/DeiT checkpoint conversion) with its blocks built from
attnzoo's shared ``TransformerBlock`` and gated ``Attention``.
"""

from __future__ import annotations

from functools import partial

import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm, Mlp
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from attnzoo.layers import Attention, TransformerBlock
from attnzoo.weights import build_model_with_official_weights

__all__ = ["gated_vit_block"]


def gated_vit_block(
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
    gate: str = "elementwise",
    device=None,
    dtype=None,
) -> TransformerBlock:
    """Build one block for timm's ``VisionTransformer(block_fn=...)`` from attnzoo's block and gated attention.

    Takes the keyword arguments ``VisionTransformer`` passes to its ``block_fn``; ``attn_layer`` and ``depth`` are
    accepted for that reason and unused (the mixer is always :class:`attnzoo.layers.Attention`).
    """
    if scale_mlp_norm:
        raise ValueError("scale_mlp_norm is not supported by gated ViT blocks")
    dd = {"device": device, "dtype": dtype}
    mixer = Attention(
        dim,
        num_heads=num_heads,
        qkv_bias=qkv_bias,
        qk_norm=qk_norm,
        scale_norm=scale_attn_norm,
        proj_bias=proj_bias,
        gate=gate,
        attn_drop=attn_drop,
        proj_drop=proj_drop,
        norm_layer=norm_layer,
        **dd,
    )
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


def _create_gated_vit(variant: str, pretrained: bool = False, gate: str = "elementwise", **kwargs) -> VisionTransformer:
    out_indices = kwargs.pop("out_indices", 3)
    kwargs.setdefault("dynamic_img_size", True)
    return build_model_with_official_weights(
        VisionTransformer,
        variant,
        pretrained,
        block_fn=partial(gated_vit_block, gate=gate),
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(**kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        "paper_ids": ["arXiv:2505.06708", "arXiv:2012.12877"],
        "paper_name": "Gated Attention for Large Language Models; Training data-efficient image transformers",
        "origin_url": "https://arxiv.org/abs/2505.06708",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "gated_vit_tiny_patch16_224": _cfg(),
        "gated_vit_small_patch16_224": _cfg(),
        "gated_vit_base_patch16_224": _cfg(),
    }
)


@register_model
def gated_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Gated ViT-Ti/16 (DeiT-Tiny config: 192 wide, 12 blocks, 3 heads)."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_gated_vit("gated_vit_tiny_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def gated_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Gated ViT-S/16 (DeiT-Small config: 384 wide, 12 blocks, 6 heads)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_gated_vit("gated_vit_small_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def gated_vit_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Gated ViT-B/16 (DeiT-Base config: 768 wide, 12 blocks, 12 heads)."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_gated_vit("gated_vit_base_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))
