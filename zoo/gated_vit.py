"""Plain ViT with gated attention (DeiT configs).

Output gate of Qiu et al., 2025 ("Gated Attention for Large Language Models", G1 position) on DeiT-T/S/B
(Touvron et al., 2021): every block's attention output is multiplied by ``sigmoid(x W_g)`` (per element by default,
``gate="headwise"`` for one gate per head, ``gate="none"`` for a plain DeiT) before the output projection.
``gate="moh"`` routes every token to ``moh_topk`` of its heads plus ``moh_shared_heads`` always-active ones
(mixture-of-head attention, :class:`~attnzoo.layers.MoHGate`; registered as ``moh_vit_*`` in :mod:`attnzoo.moh_vit`).

The model is timm's ``VisionTransformer`` with timm's ``Block`` (so it has timm's whole ViT API:
``forward_intermediates``, ``features_only``, ``dynamic_img_size``, position-embedding resampling, timm/DeiT
checkpoint conversion, attention masks); the gate lives in the attention class timm's blocks build (``attn_layer``):
attnzoo's :class:`~attnzoo.layers.Attention` with the chosen gate, and timm's own ``Attention`` for ``gate="none"``,
which makes that model exactly timm's DeiT. Inputs whose sides are not multiples of 16 are zero-padded at the
bottom/right to whole patches (timm's ``dynamic_img_pad``).
"""

from __future__ import annotations

import functools
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Attention as TimmAttention
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from attnzoo.layers import GATES, Attention, ZooVisionTransformer
from attnzoo.weights import build_model_with_official_weights

__all__ = ["ElementwiseGatedAttention", "HeadwiseGatedAttention", "gated_attention_layer", "moh_attention_layer"]


class ElementwiseGatedAttention(Attention):
    """:class:`~attnzoo.layers.Attention` with an elementwise output gate, as a class (timm's ``attn_layer``)."""

    def __init__(self, dim: int, **kwargs: Any) -> None:
        super().__init__(dim, gate="elementwise", **kwargs)


class HeadwiseGatedAttention(Attention):
    """:class:`~attnzoo.layers.Attention` with a headwise output gate, as a class (timm's ``attn_layer``)."""

    def __init__(self, dim: int, **kwargs: Any) -> None:
        super().__init__(dim, gate="headwise", **kwargs)


_ATTN_LAYERS = {"none": TimmAttention, "elementwise": ElementwiseGatedAttention, "headwise": HeadwiseGatedAttention}


@functools.cache
def moh_attention_layer(topk: int, shared_heads: int = 0) -> type:
    """:class:`~attnzoo.layers.Attention` with mixture-of-head routing (``topk`` routed heads per token,
    ``shared_heads`` always active), as a class (timm's ``attn_layer``); one class per setting."""

    class MoHAttention(Attention):
        def __init__(self, dim: int, **kwargs: Any) -> None:
            super().__init__(dim, gate="moh", moh_topk=topk, moh_shared_heads=shared_heads, **kwargs)

    MoHAttention.__qualname__ = f"MoHAttention(topk={topk}, shared_heads={shared_heads})"
    return MoHAttention


def gated_attention_layer(gate: str, moh_topk: int | None = None, moh_shared_heads: int = 0) -> type:
    """The attention class of timm's ViT ``Block`` for ``gate`` (one of :data:`attnzoo.layers.GATES`);
    ``moh_topk`` / ``moh_shared_heads`` configure ``gate="moh"``."""
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    if gate != "moh" and (moh_topk is not None or moh_shared_heads):
        raise ValueError(f"moh_topk / moh_shared_heads only apply to gate='moh', got gate={gate!r}")
    if gate == "moh":
        if not isinstance(moh_topk, int) or not isinstance(moh_shared_heads, int):
            raise TypeError(
                f"gate='moh' needs integer moh_topk and moh_shared_heads, got {moh_topk!r}, {moh_shared_heads!r}"
            )
        return moh_attention_layer(moh_topk, moh_shared_heads)
    return _ATTN_LAYERS[gate]


def _create_gated_vit(
    variant: str,
    pretrained: bool = False,
    gate: str = "elementwise",
    moh_topk: int | None = None,
    moh_shared_heads: int = 0,
    **kwargs,
) -> VisionTransformer:
    out_indices = kwargs.pop("out_indices", 3)
    kwargs.setdefault("dynamic_img_size", True)
    kwargs.setdefault("dynamic_img_pad", True)
    return build_model_with_official_weights(
        ZooVisionTransformer,
        variant,
        pretrained,
        attn_layer=gated_attention_layer(gate, moh_topk, moh_shared_heads),
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
