"""MetaPool: a hybrid MetaFormer with pooling and attention token mixers and a SimPool head.

The PoolFormer paper's hybrid (Yu et al., CVPR 2022, "MetaFormer Is Actually What You Need for Vision": pooling in
the first two stages, attention in the last two) assembled from attnzoo's shared layers: a 7x7 stride-4 overlapping
patch stem, attnzoo's ``"pooling"`` mixer (``avgpool3x3(x) - x``) and ``"attention"`` mixer in pre-norm
``TransformerBlock`` s with LayerScale, 3x3 stride-2 conv downsampling, and SimPool attention pooling (Psomas et al.,
ICCV 2023) as the classifier's global pooling (``global_pool="simpool"``; any timm pool type also works).

The names ``metapool_*`` keep clear of timm's ``poolformer_*`` / ``poolformerv2_*`` (the pure pooling models, use
those for PoolFormer weights). Norms are channels-last LayerNorms instead of PoolFormer's GroupNorm(1); no released
weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm
from timm.models import generate_default_cfgs, register_model

from attnzoo.layers import (
    ConvDownsample,
    HierarchicalVisionTransformer,
    OverlapPatchEmbed,
    TransformerBlock,
    build_stages,
    create_mixer,
)
from attnzoo.weights import build_model_with_official_weights, unwrap_state_dict

__all__ = ["MetaPool", "checkpoint_filter_fn"]


class MetaPool(HierarchicalVisionTransformer):
    """Hierarchical MetaFormer with one registered token mixer per stage.

    Args:
        depths, dims: blocks and width of each stage.
        mixers: registered token-mixer name of each stage (``"pooling"``, ``"attention"``, ...).
        head_dim: channels per head of the attention stages (``num_heads = dim // head_dim``).
        pool_size: window of the pooling mixers.
        mlp_ratio, layer_scale_init_value, drop_path_rate: block settings.
        gate: output gate of every mixer (``"none"``, ``"headwise"``, ``"elementwise"``).
        global_pool: ``"simpool"`` (default) or any timm pool type.
    """

    def __init__(
        self,
        depths: Sequence[int] = (2, 2, 6, 2),
        dims: Sequence[int] = (64, 128, 320, 512),
        mixers: Sequence[str] = ("pooling", "pooling", "attention", "attention"),
        head_dim: int = 32,
        pool_size: int = 3,
        mlp_ratio: float = 4.0,
        layer_scale_init_value: float | None = 1e-5,
        gate: str = "none",
        drop_path_rate: float = 0.0,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "simpool",
        drop_rate: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        dd = {"device": device, "dtype": dtype}
        if not len(depths) == len(dims) == len(mixers):
            raise ValueError("depths, dims and mixers must have one entry per stage")

        def make_block(i: int, j: int, drop_path: float) -> nn.Module:
            kind_args = {"pool_size": pool_size} if mixers[i] == "pooling" else {}
            mixer = create_mixer(
                mixers[i], dims[i], num_heads=max(dims[i] // head_dim, 1), gate=gate, **kind_args, **dd
            )
            return TransformerBlock(
                dims[i],
                mixer,
                mlp_ratio=mlp_ratio,
                drop_path=drop_path,
                layer_scale_init_value=layer_scale_init_value,
                norm_layer=LayerNorm,
                **dd,
            )

        def make_downsample(i: int) -> nn.Module | None:
            return ConvDownsample(dims[i - 1], dims[i], bias=True, **dd) if i else None

        stem = OverlapPatchEmbed(in_chans, dims[0], patch_size=7, stride=4, **dd)
        stages = build_stages(depths, make_block, make_downsample, drop_path_rate)
        super().__init__(
            stem,
            stages,
            dims,
            stem_stride=4,
            num_classes=num_classes,
            global_pool=global_pool,
            in_chans=in_chans,
            drop_rate=drop_rate,
            **dd,
        )


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: MetaPool) -> dict[str, torch.Tensor]:
    """Unwrap a training checkpoint (``{"model": ...}``, ``{"state_dict": ...}``) saved from this class."""
    return unwrap_state_dict(state_dict)


def _create_metapool(variant: str, pretrained: bool = False, **kwargs) -> MetaPool:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_official_weights(
        MetaPool,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(**kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.proj",
        "classifier": "head.fc",
        "license": "apache-2.0",
        "paper_ids": ["arXiv:2111.11418", "arXiv:2309.06891"],
        "paper_name": "MetaFormer Is Actually What You Need for Vision; Keep It SimPool",
        "origin_url": "https://arxiv.org/abs/2111.11418",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({"metapool_hybrid_s12": _cfg()})


@register_model
def metapool_hybrid_s12(pretrained: bool = False, **kwargs) -> MetaPool:
    """Hybrid MetaFormer-S12: depths 2-2-6-2, dims 64-128-320-512, pooling / pooling / attention / attention,
    SimPool head."""
    return _create_metapool("metapool_hybrid_s12", pretrained=pretrained, **kwargs)
