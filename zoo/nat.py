"""NAT (Hassani et al., CVPR 2023, "Neighborhood Attention Transformer") and DiNAT (Hassani & Shi, 2022, "Dilated
Neighborhood Attention Transformer").

Four stages on channels-last maps: a conv stem (two 3x3 stride-2 convs, LayerNorm; stride 4), 3x3 stride-2 conv
downsampling without bias + LayerNorm between stages, pre-norm blocks ``x += NA(LN(x)); x += MLP(LN(x))`` with
neighborhood attention (kernel 7, head dim 32, RPB in every layer, :class:`attnzoo.layers.NeighborhoodAttention2d`),
optional layer scale (1e-5 for NAT-S/B and DiNAT-B), LayerNorm eps 1e-5, a final LayerNorm, average pooling and the
head. DiNAT is the same network with dilated neighborhoods in every other block (dilations per stage at 224 px:
``[1, 8, 1]``, ``[1, 4, 1, 4]``, ``[1, 2] * 9``, ``[1] * 5``). Built from attnzoo's shared
``HierarchicalVisionTransformer``, ``TransformerBlock``, ``ConvStem`` and ``ConvDownsample``.

DiNAT-Large (ImageNet-22k pre-trained) has one architecture per official checkpoint, chosen by the pretrained tag:
``dinat_large.in22k_ft_in1k_384`` uses the 384 px dilations ``[1, 13, 1]``, ``[1, 6, 1, 6]``, ``[1, 3] * 9`` and the
``*_k11`` tags kernel 11 (see ``_DINAT_LARGE_TAGS``); explicit keyword arguments override the tag's.

Any input size works: by default a dilation is clamped per axis to ``max(1, side // kernel)`` when a map is
smaller than ``kernel * dilation``, and maps smaller than the kernel are padded and masked by ``na2d``;
``small_maps="zero_pad"`` computes as the official code (NATTEN <= 0.14) instead: the map is zero-padded to
``kernel * dilation`` before the qkv projection, the padded tokens take part, the output is cropped (see
:class:`~attnzoo.layers.NeighborhoodAttention2d`). :func:`checkpoint_filter_fn` loads the official checkpoints
(``patch_embed``, ``levels.i.blocks.j``, ``gamma1/2``, ``levels.i.downsample``, and ``norm0..3`` of the detection /
segmentation backbones) and the Hugging Face ``transformers`` layout (``nat.`` / ``dinat.`` prefixes,
``attention.self.query/key/value/rpb``, ``layer_scale_parameters``).

Official downstream backbone (SHI-Labs ``detection/nat.py``, ``segmentation/nat.py``): ``out_norms=True`` (a
LayerNorm on each stage output, official ``norm{i}``), ``small_maps="zero_pad"``, and for DiNAT the task's dilations,
e.g. DiNAT-Mini on COCO ``dilations=[[1, 28, 1], [1, 7, 1, 14], [1, 3, 1, 5, 1, 7], [1, 3, 1, 3, 1]]``; the RPB tables
stay ``(heads, 2k - 1, 2k - 1)`` whatever the dilation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm, LayerNorm2d
from timm.models import generate_default_cfgs, register_model, resolve_pretrained_cfg

from attnzoo.layers import (
    ConvDownsample,
    ConvStem,
    HierarchicalVisionTransformer,
    NeighborhoodAttention2d,
    TransformerBlock,
    build_stages,
)
from attnzoo.weights import build_model_with_official_weights, unwrap_state_dict
from attnzoo.weights.downstream import OUT_NORMS, add_new_output_norms

__all__ = ["NAT", "checkpoint_filter_fn"]


class NAT(HierarchicalVisionTransformer):
    """NAT / DiNAT backbone with the timm model API (see the module docstring).

    Args:
        depths: blocks per stage.
        num_heads: heads per stage.
        embed_dim: width of the first stage; stage ``i`` is ``embed_dim * 2**i`` wide.
        mlp_ratio: MLP hidden width relative to the stage width.
        kernel_size: neighborhood size of every block.
        dilations: per stage, the dilation of each block (``None``: 1 everywhere, i.e. NAT).
        layer_scale: initial layer-scale value (``None``: no layer scale).
        drop_path_rate: stochastic depth, rising linearly over all blocks.
        gate: output gate of the attention (``"none"`` is the published model).
        backend: ``na2d`` backend of every block.
        small_maps: maps smaller than ``kernel * dilation``: ``"clamp"`` the dilation or ``"zero_pad"`` the map (the
            official semantics), see :class:`~attnzoo.layers.NeighborhoodAttention2d`.
        out_norms: add a LayerNorm (eps 1e-5) on each stage output, applied to the maps ``forward_intermediates`` /
            ``features_only`` return and not fed to the next stage (the official downstream backbones' ``norm{i}``).
    """

    # why `attnzoo export --dynamic-size` refuses it before tracing (weights.onnx_export.dynamic_size_refusal)
    dynamic_size_unsupported = "its neighbourhood tiles (and the dilation clamp) are computed from the concrete size"

    def __init__(
        self,
        depths: Sequence[int] = (3, 4, 6, 5),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        embed_dim: int = 64,
        mlp_ratio: float = 3.0,
        kernel_size: int = 7,
        dilations: Sequence[Sequence[int]] | None = None,
        layer_scale: float | None = None,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        gate: str = "none",
        backend: str = "auto",
        small_maps: str = "clamp",
        out_norms: bool = False,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        device=None,
        dtype=None,
    ) -> None:
        dd = {"device": device, "dtype": dtype}
        if len(num_heads) != len(depths):
            raise ValueError(f"num_heads needs one entry per stage ({len(depths)}), got {list(num_heads)}")
        if dilations is None:
            dilations = [[1] * depth for depth in depths]
        if [len(d) for d in dilations] != list(depths):
            raise ValueError(f"dilations must give one dilation per block of stages {list(depths)}, got {dilations}")
        dims = [embed_dim * 2**i for i in range(len(depths))]
        norm_layer = partial(LayerNorm, eps=1e-5)
        norm_layer_2d = partial(LayerNorm2d, eps=1e-5)

        def make_block(i: int, j: int, drop_path: float) -> TransformerBlock:
            mixer = NeighborhoodAttention2d(
                dims[i],
                num_heads=num_heads[i],
                kernel_size=kernel_size,
                dilation=dilations[i][j],
                qkv_bias=qkv_bias,
                gate=gate,
                proj_drop=proj_drop_rate,
                backend=backend,
                small_maps=small_maps,
                **dd,
            )
            return TransformerBlock(
                dims[i],
                mixer,
                mlp_ratio=mlp_ratio,
                drop_path=drop_path,
                layer_scale_init_value=layer_scale,
                proj_drop=proj_drop_rate,
                norm_layer=norm_layer,
                **dd,
            )

        def make_downsample(i: int) -> nn.Module | None:
            return ConvDownsample(dims[i - 1], dims[i], bias=False, norm_layer=norm_layer_2d, **dd) if i else None

        stem = ConvStem(in_chans, dims[0], norm_layer=norm_layer_2d, **dd)
        stages = build_stages(depths, make_block, make_downsample, drop_path_rate)
        super().__init__(
            stem,
            stages,
            dims,
            norm_layer=norm_layer,
            out_norm_layer=norm_layer if out_norms else None,
            num_classes=num_classes,
            global_pool=global_pool,
            in_chans=in_chans,
            drop_rate=drop_rate,
            **dd,
        )


_OFFICIAL_BLOCK_RENAMES = (("gamma1", "ls1.gamma"), ("gamma2", "ls2.gamma"))

_HF_BLOCK_RENAMES = (
    ("layernorm_before.", "norm1."),
    ("attention.self.rpb", "attn.rpb"),
    ("attention.output.dense.", "attn.proj."),
    ("layernorm_after.", "norm2."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
)


def _convert_official_key(key: str) -> str:
    """Official NAT / DiNAT key -> attnzoo key (the downsampling that ends official level i starts stage i + 1)."""
    if key.startswith("patch_embed."):
        return "stem." + key[len("patch_embed.") :]
    match = re.match(r"levels\.(\d+)\.downsample\.(.*)", key)
    if match:
        return f"stages.{int(match.group(1)) + 1}.downsample.{match.group(2)}"
    match = re.match(r"levels\.(\d+)\.blocks\.(\d+)\.(.*)", key)
    if match:
        stage, block, rest = match.groups()
        for old, new in _OFFICIAL_BLOCK_RENAMES:
            if rest == old:
                rest = new
        return f"stages.{stage}.blocks.{block}.{rest}"
    if key.startswith("head."):
        return "head.fc." + key[len("head.") :]
    match = re.match(r"norm(\d+)\.(.*)", key)  # output norms of the detection / segmentation backbones
    if match:
        return f"{OUT_NORMS}{match.group(1)}.{match.group(2)}"
    return key


def _convert_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ``NatForImageClassification`` / ``DinatForImageClassification`` (or the bare model) -> attnzoo."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        key = re.sub(r"^(nat|dinat)\.", "", key)
        if key.startswith("embeddings.patch_embeddings.projection."):
            out["stem.proj." + key[len("embeddings.patch_embeddings.projection.") :]] = value
        elif key.startswith("embeddings.norm."):
            out["stem.norm." + key[len("embeddings.norm.") :]] = value
        elif key.startswith("layernorm."):
            out["norm." + key[len("layernorm.") :]] = value
        elif key.startswith("classifier."):
            out["head.fc." + key[len("classifier.") :]] = value
        elif match := re.match(r"encoder\.levels\.(\d+)\.downsample\.(.*)", key):
            out[f"stages.{int(match.group(1)) + 1}.downsample.{match.group(2)}"] = value
        elif match := re.match(r"encoder\.levels\.(\d+)\.layers\.(\d+)\.(.*)", key):
            prefix, rest = f"stages.{match.group(1)}.blocks.{match.group(2)}.", match.group(3)
            if projection := re.match(r"attention\.self\.(query|key|value)\.(weight|bias)", rest):
                qkv.setdefault(prefix + "attn.qkv." + projection.group(2), {})[projection.group(1)] = value
            elif rest == "layer_scale_parameters":
                out[prefix + "ls1.gamma"], out[prefix + "ls2.gamma"] = value[0], value[1]
            else:
                for old, new in _HF_BLOCK_RENAMES:
                    if rest.startswith(old):
                        rest = new + rest[len(old) :]
                        break
                out[prefix + rest] = value
        else:
            out[key] = value
    for key, parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"checkpoint has an incomplete query/key/value set for {key}: {sorted(parts)}")
        out[key] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def checkpoint_filter_fn(state_dict: dict, model: NAT, new_output_norms: bool = True) -> dict[str, torch.Tensor]:
    """Map an official NAT / DiNAT checkpoint (bare or wrapped as ``{"model": ...}`` / ``{"state_dict": ...}``;
    classification or downstream backbone) or a Hugging Face ``transformers`` NAT / DiNAT state dict onto attnzoo's
    keys; attnzoo state dicts pass unchanged. ``new_output_norms``: a model with output norms gets its own (untrained)
    ones when the checkpoint has none (:func:`~attnzoo.weights.downstream.add_new_output_norms`)."""
    state_dict = unwrap_state_dict(state_dict)
    if any(k.startswith(("nat.", "dinat.", "embeddings.", "encoder.levels.")) for k in state_dict):
        state_dict = _convert_hf(state_dict)
    elif any(k.startswith(("patch_embed.", "levels.")) for k in state_dict):
        state_dict = {_convert_official_key(k): v for k, v in state_dict.items()}
    return add_new_output_norms(state_dict, model) if new_output_norms else state_dict


def _create_nat(variant: str, pretrained: bool = False, **kwargs) -> NAT:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_official_weights(
        NAT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(url: str = "", dilated: bool = False, **kwargs) -> dict:
    paper = (
        {
            "paper_ids": "arXiv:2209.15001",
            "paper_name": "Dilated Neighborhood Attention Transformer",
        }
        if dilated
        else {"paper_ids": "arXiv:2204.07143", "paper_name": "Neighborhood Attention Transformer"}
    )
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.proj.0",
        "classifier": "head.fc",
        "license": "mit",
        "origin_url": "https://github.com/SHI-Labs/Neighborhood-Attention-Transformer",
        **paper,
        **kwargs,
    }


_NAT_URL = "https://shi-labs.com/projects/nat/checkpoints/CLS/{}.pth"
_DINAT_URL = "https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/{}_in1k_224.pth"
_DINAT_LARGE_URL = "https://shi-labs.com/projects/dinat/checkpoints/{}/dinat_large_{}.pth"
_384 = dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0)  # NAT:classification/configs/*_384.yml

# Official ImageNet-1k checkpoints (bare state dicts with the official key names). The same weights are on the
# Hugging Face Hub as transformers models (shi-labs/nat-mini-in1k-224, shi-labs/dinat-mini-in1k-224, ...), which
# checkpoint_filter_fn also reads.
default_cfgs = generate_default_cfgs(
    {
        "nat_mini.in1k": _cfg(url=_NAT_URL.format("nat_mini")),
        "nat_tiny.in1k": _cfg(url=_NAT_URL.format("nat_tiny")),
        "nat_small.in1k": _cfg(url=_NAT_URL.format("nat_small")),
        "nat_base.in1k": _cfg(url=_NAT_URL.format("nat_base")),
        "dinat_mini.in1k": _cfg(url=_DINAT_URL.format("dinat_mini"), dilated=True),
        "dinat_tiny.in1k": _cfg(url=_DINAT_URL.format("dinat_tiny"), dilated=True),
        "dinat_small.in1k": _cfg(url=_DINAT_URL.format("dinat_small"), dilated=True),
        "dinat_base.in1k": _cfg(url=_DINAT_URL.format("dinat_base"), dilated=True),
        # DiNAT-L, pre-trained on ImageNet-22k (21841 classes) at 224 px, fine-tuned on ImageNet-1k at 224 / 384 px
        # (Hub: shi-labs/dinat-large-in22k-in1k-224, -in22k-in1k-384, dinat-large-11x11-in22k-in1k-384)
        "dinat_large.in22k_ft_in1k": _cfg(url=_DINAT_LARGE_URL.format("imagenet1k", "in22k_in1k_224"), dilated=True),
        "dinat_large.in22k_ft_in1k_384": _cfg(
            url=_DINAT_LARGE_URL.format("imagenet1k", "in22k_in1k_384"), dilated=True, **_384
        ),
        "dinat_large.in22k_ft_in1k_384_k11": _cfg(
            url=_DINAT_LARGE_URL.format("imagenet1k", "in22k_in1k_384_11x11"), dilated=True, **_384
        ),
        "dinat_large.in22k": _cfg(
            url=_DINAT_LARGE_URL.format("imagenet22k", "in22k_224"), dilated=True, num_classes=21841
        ),
        # the in22k weights with the RPB tables interpolated (bicubic) to 11x11: the start of the 384 px k11 fine-tune
        "dinat_large.in22k_k11": _cfg(
            url=_DINAT_LARGE_URL.format("imagenet22k", "in22k_224_11x11interp"), dilated=True, num_classes=21841
        ),
    }
)

# DiNAT dilations at 224 px (maps 56, 28, 14, 7): the deepest dilation of a stage fills its map (8 * 7 = 56, ...)
_DINAT_DILATIONS = ([1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1] * 5)
# ... and at 384 px (maps 96, 48, 24, 12): side // 7 = 13, 6, 3 (official dinat_large_384)
_DINAT_DILATIONS_384 = ([1, 13, 1], [1, 6, 1, 6], [1, 3] * 9, [1] * 5)
_MINI_DEPTHS = (3, 4, 6, 5)
_DEPTHS = (3, 4, 18, 5)


def _dinat_dilations(depths: Sequence[int], table: Sequence[Sequence[int]] = _DINAT_DILATIONS) -> list[list[int]]:
    return [list(dilations[:depth]) for dilations, depth in zip(table, depths)]


_MINI = dict(depths=_MINI_DEPTHS, num_heads=(2, 4, 8, 16), embed_dim=64, mlp_ratio=3.0, drop_path_rate=0.2)
_TINY = dict(depths=_DEPTHS, num_heads=(2, 4, 8, 16), embed_dim=64, mlp_ratio=3.0, drop_path_rate=0.2)
_SMALL = dict(depths=_DEPTHS, num_heads=(3, 6, 12, 24), embed_dim=96, mlp_ratio=2.0, drop_path_rate=0.3)
_BASE = dict(depths=_DEPTHS, num_heads=(4, 8, 16, 32), embed_dim=128, mlp_ratio=2.0, drop_path_rate=0.5)
_LARGE = dict(depths=_DEPTHS, num_heads=(6, 12, 24, 48), embed_dim=192, mlp_ratio=2.0, drop_path_rate=0.35)

# The architecture of each DiNAT-L checkpoint (official dinat_large, _384, _384_11x11, _21k, _21k_11x11)
_DINAT_LARGE_TAGS = {
    "in22k_ft_in1k": {},
    "in22k_ft_in1k_384": dict(dilations=_dinat_dilations(_DEPTHS, _DINAT_DILATIONS_384)),
    "in22k_ft_in1k_384_k11": dict(kernel_size=11),
    "in22k": dict(drop_path_rate=0.2),
    "in22k_k11": dict(kernel_size=11, drop_path_rate=0.2),
}


def _build(variant: str, pretrained: bool, config: dict, kwargs: dict, dilated: bool = False, **extra) -> NAT:
    model_args = dict(config)
    if dilated:
        model_args["dilations"] = _dinat_dilations(config["depths"])
    return _create_nat(variant, pretrained=pretrained, **{**model_args, **extra, **kwargs})


@register_model
def nat_mini(pretrained: bool = False, **kwargs) -> NAT:
    """NAT-Mini: depths 3-4-6-5, dim 64, heads 2-4-8-16, MLP ratio 3 (19.98M params)."""
    return _build("nat_mini", pretrained, _MINI, kwargs)


@register_model
def nat_tiny(pretrained: bool = False, **kwargs) -> NAT:
    """NAT-Tiny: depths 3-4-18-5, dim 64, heads 2-4-8-16, MLP ratio 3 (27.90M params)."""
    return _build("nat_tiny", pretrained, _TINY, kwargs)


@register_model
def nat_small(pretrained: bool = False, **kwargs) -> NAT:
    """NAT-Small: depths 3-4-18-5, dim 96, heads 3-6-12-24, MLP ratio 2, layer scale 1e-5 (50.74M params)."""
    return _build("nat_small", pretrained, _SMALL, kwargs, layer_scale=1e-5)


@register_model
def nat_base(pretrained: bool = False, **kwargs) -> NAT:
    """NAT-Base: depths 3-4-18-5, dim 128, heads 4-8-16-32, MLP ratio 2, layer scale 1e-5 (89.77M params)."""
    return _build("nat_base", pretrained, _BASE, kwargs, layer_scale=1e-5)


@register_model
def dinat_mini(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Mini: NAT-Mini with dilations [1,8,1], [1,4,1,4], [1,2,1,2,1,2], [1]*5 (19.98M params)."""
    return _build("dinat_mini", pretrained, _MINI, kwargs, dilated=True)


@register_model
def dinat_tiny(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Tiny: NAT-Tiny with dilations [1,8,1], [1,4,1,4], [1,2]*9, [1]*5 (27.90M params)."""
    return _build("dinat_tiny", pretrained, _TINY, kwargs, dilated=True)


@register_model
def dinat_small(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Small: NAT-Small with dilations and without layer scale (50.72M params)."""
    return _build("dinat_small", pretrained, _SMALL, kwargs, dilated=True)


@register_model
def dinat_base(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Base: NAT-Base with dilations, layer scale 1e-5 (89.77M params)."""
    return _build("dinat_base", pretrained, _BASE, kwargs, dilated=True, layer_scale=1e-5)


@register_model
def dinat_large(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Large: depths 3-4-18-5, dim 192, heads 6-12-24-48, MLP ratio 2, no layer scale (200M params); kernel
    and dilations follow the pretrained tag (``.in22k_ft_in1k_384``: 384 px dilations, ``*_k11``: kernel 11)."""
    tag = resolve_pretrained_cfg("dinat_large", pretrained_cfg=kwargs.get("pretrained_cfg")).tag
    return _build("dinat_large", pretrained, _LARGE, kwargs, dilated=True, **_DINAT_LARGE_TAGS.get(tag, {}))
