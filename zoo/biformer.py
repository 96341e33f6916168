"""BiFormer (Zhu et al., CVPR 2023, "BiFormer: Vision Transformer with Bi-Level Routing Attention").

Four stages on channels-last maps: a BatchNorm conv stem (stride 4), BatchNorm conv downsampling, and pre-norm blocks
``x += DWConv3x3(x); x += BRA(LN(x)); x += MLP(LN(x))`` (LayerNorm eps 1e-6, MLP ratio 3). Stages 1-3 use bi-level
routing attention (:class:`attnzoo.layers.BiLevelRoutingAttention`, ``n_win=7``, top-k 1 / 4 / 16, head dim 32,
scale ``qk_dim ** -0.5``), stage 4 global attention with 8 heads and a 5x5 LCE
(:class:`attnzoo.layers.GlobalAttentionLePE`); a final BatchNorm, average pooling and the head.
Built from attnzoo's shared ``HierarchicalVisionTransformer``, ``TransformerBlock``, ``ConvStem``, ``ConvDownsample``.

Any input size works: each routing block pads its map to a multiple of ``n_win`` (see the layer) — with zeros
that take part in attention as published (``padding="zero"``), or excluded (``padding="mask"``, e.g.
``timm.create_model("biformer_tiny", padding="mask")``; identical where no padding occurs, e.g. 224 px). The released
ImageNet-1k checkpoints (official keys) load through :func:`checkpoint_filter_fn`.

Official downstream backbone (BiFormer ``object_detection/models_mm/biformer_mm.py``, ``semantic_segmentation/...``):
``n_win=16`` (COCO) or ``8`` (ADE20K), ``auto_pad=True`` (the official name of ``padding="zero"``) and
``out_norms=True`` (a LayerNorm2d, eps 1e-6, on each output: the official ``extra_norms.{i}``); the classifier and
final BatchNorm are dropped. Detection freezes the BatchNorm statistics (mmdet ``norm_eval``), a detector setting.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm
from timm.models import generate_default_cfgs, register_model

from attnzoo.layers import (
    Attention,
    BiLevelRoutingAttention,
    ConvDownsample,
    ConvStem,
    GlobalAttentionLePE,
    HierarchicalVisionTransformer,
    TransformerBlock,
    build_stages,
)
from attnzoo.weights import build_model_with_official_weights, unwrap_state_dict
from attnzoo.weights.downstream import OUT_NORMS, add_new_output_norms

__all__ = ["BiFormer", "checkpoint_filter_fn"]


class BatchNormChannelsLast(nn.BatchNorm2d):
    """``BatchNorm2d`` on a channels-last map ``(B, H, W, C)`` (BiFormer's final norm; same parameters and buffers).

    ``forward`` restates ``BatchNorm2d``'s (running statistics with a fixed ``momentum``) because TorchScript cannot
    call ``super().forward``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        momentum = self.momentum if self.momentum is not None else 0.0
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or self.running_mean is None
        x = F.batch_norm(
            x.permute(0, 3, 1, 2),
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
        )
        return x.permute(0, 2, 3, 1)


class BiFormer(HierarchicalVisionTransformer):
    """BiFormer backbone and classifier.

    Args:
        depths, dims: blocks and width of each stage.
        topks: routed regions per stage; ``-2``: global attention with the LCE side conv (official last stage),
            ``-1``: plain global attention.
        n_win: regions per side of every routing stage.
        head_dim: channels per head of the routing stages (``num_heads = qk_dim // head_dim``).
        qk_dims: query/key width per stage (default ``dims``).
        global_heads: heads of the global-attention stages (8 in the official models).
        mlp_ratio, side_dwconv, cpe_kernel_size: MLP width ratio, LCE kernel, conditional position encoding kernel.
        gate: output gate of every attention (``"none"`` as published).
        backend: routed-attention backend (``"auto"``: Triton on CUDA, reference elsewhere).
        padding: padding of maps whose sides are not multiples of ``n_win`` in the routing stages: ``"zero"``
            (official ``auto_pad``: zero-padded at the right / bottom after ``norm1`` and before the qkv projection,
            the padded tokens carry the qkv bias and take part in the region means, keys and the LCE, unmasked; the
            output is cropped) or ``"mask"`` (padded tokens are excluded).
        auto_pad: the official switch: ``True`` is ``padding="zero"`` (so an explicit ``padding="mask"`` with it is an
            error). The official ``False`` (map sides must be multiples of ``n_win``) is not offered: attnzoo pads
            every map; where the sides are multiples no padding occurs and both agree.
        out_norms: add a LayerNorm (eps 1e-6) on each stage output, applied to the maps ``forward_intermediates`` /
            ``features_only`` return and not fed to the next stage (official ``extra_norms``).
    """

    # why `attnzoo export --dynamic-size` refuses it before tracing (weights.onnx_export.dynamic_size_refusal)
    dynamic_size_unsupported = "the padding of its routing regions is computed from the concrete size"

    def __init__(
        self,
        depths: Sequence[int] = (2, 2, 8, 2),
        dims: Sequence[int] = (64, 128, 256, 512),
        topks: Sequence[int] = (1, 4, 16, -2),
        n_win: int = 7,
        head_dim: int = 32,
        qk_dims: Sequence[int] | None = None,
        global_heads: int = 8,
        mlp_ratio: float = 3.0,
        side_dwconv: int = 5,
        cpe_kernel_size: int = 3,
        gate: str = "none",
        backend: str = "auto",
        padding: str = "zero",
        auto_pad: bool | None = None,
        out_norms: bool = False,
        drop_path_rate: float = 0.0,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        dd = {"device": device, "dtype": dtype}
        qk_dims = tuple(qk_dims or dims)
        if not len(depths) == len(dims) == len(topks) == len(qk_dims):
            raise ValueError("depths, dims, topks and qk_dims must have one entry per stage")
        if auto_pad is not None:
            if auto_pad is not True:
                raise ValueError(
                    f"auto_pad must be True (the official padding, padding='zero') or left unset, got {auto_pad!r}; "
                    "attnzoo pads every map (padding='zero' or 'mask'), so the official auto_pad=False is not offered"
                )
            if padding != "zero":
                raise ValueError(f"auto_pad=True is padding='zero'; it contradicts padding={padding!r}")
        norm_layer = partial(LayerNorm, eps=1e-6)

        def make_mixer(i: int) -> nn.Module:
            if topks[i] > 0:
                return BiLevelRoutingAttention(
                    dims[i],
                    num_heads=qk_dims[i] // head_dim,
                    n_win=n_win,
                    topk=topks[i],
                    qk_dim=qk_dims[i],
                    side_dwconv=side_dwconv,
                    gate=gate,
                    backend=backend,
                    padding=padding,
                    **dd,
                )
            if topks[i] == -2:
                return GlobalAttentionLePE(dims[i], num_heads=global_heads, side_dwconv=side_dwconv, gate=gate, **dd)
            if topks[i] == -1:
                return Attention(dims[i], num_heads=global_heads, gate=gate, **dd)
            raise ValueError(f"topks entries must be positive, -1 or -2, got {topks[i]} for stage {i}")

        def make_block(i: int, j: int, drop_path: float) -> TransformerBlock:
            return TransformerBlock(
                dims[i],
                make_mixer(i),
                mlp_ratio=mlp_ratio,
                drop_path=drop_path,
                cpe_kernel_size=cpe_kernel_size,
                norm_layer=norm_layer,
                **dd,
            )

        def make_downsample(i: int) -> nn.Module | None:
            if i == 0:
                return None
            return ConvDownsample(dims[i - 1], dims[i], bias=True, norm_layer=nn.BatchNorm2d, **dd)

        stem = ConvStem(
            in_chans,
            dims[0],
            norm_layer=nn.BatchNorm2d,
            mid_norm_layer=nn.BatchNorm2d,
            act_layer=nn.GELU,
            bias=True,
            **dd,
        )
        stages = build_stages(depths, make_block, make_downsample, drop_path_rate)
        super().__init__(
            stem,
            stages,
            dims,
            norm_layer=BatchNormChannelsLast,
            out_norm_layer=norm_layer if out_norms else None,
            num_classes=num_classes,
            global_pool=global_pool,
            in_chans=in_chans,
            drop_rate=drop_rate,
            **dd,
        )


_BLOCK_RENAMES = (
    ("attn.qkv.qkv.", "attn.qkv."),
    ("attn.wo.", "attn.proj."),
    ("mlp.0.", "mlp.fc1."),
    ("mlp.3.", "mlp.fc2."),
)


def _convert_key(key: str) -> str:
    """Official BiFormer key -> attnzoo key."""
    if key.startswith("downsample_layers.0."):
        index, rest = key[len("downsample_layers.0.") :].split(".", 1)
        return f"stem.proj.{index}.{rest}" if index != "4" else f"stem.norm.{rest}"
    match = re.match(r"downsample_layers\.(\d+)\.(\d+)\.(.*)", key)
    if match:
        stage, index, rest = match.groups()
        return f"stages.{stage}.downsample.{'reduction' if index == '0' else 'norm'}.{rest}"
    match = re.match(r"stages\.(\d+)\.(\d+)\.(.*)", key)
    if match:
        stage, block, rest = match.groups()
        for old, new in _BLOCK_RENAMES:
            if rest.startswith(old):
                rest = new + rest[len(old) :]
        return f"stages.{stage}.blocks.{block}.{rest}"
    if key.startswith("head."):
        return "head.fc." + key[len("head.") :]
    if key.startswith("extra_norms."):  # output norms of the detection / segmentation backbones
        return OUT_NORMS + key[len("extra_norms.") :]
    return key


def checkpoint_filter_fn(state_dict: dict, model: BiFormer, new_output_norms: bool = True) -> dict[str, torch.Tensor]:
    """Map an official BiFormer checkpoint (``{"model": ...}`` or a bare state dict, official key names such as
    ``downsample_layers.*``, ``stages.i.j.attn.qkv.qkv``, ``attn.wo``, ``mlp.0``, ``head``, and ``extra_norms.i`` of
    the downstream backbones) onto attnzoo's keys; attnzoo-format state dicts pass through unchanged.
    ``new_output_norms``: a model with output norms gets its own (untrained) ones when the checkpoint has none
    (:func:`~attnzoo.weights.downstream.add_new_output_norms`)."""
    state_dict = unwrap_state_dict(state_dict)
    if "stem.proj.0.weight" not in state_dict:
        state_dict = {_convert_key(k): v for k, v in state_dict.items()}
    return add_new_output_norms(state_dict, model) if new_output_norms else state_dict


def _create_biformer(variant: str, pretrained: bool = False, **kwargs) -> BiFormer:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_official_weights(
        BiFormer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(url: str = "", **kwargs) -> dict:
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
        "paper_ids": "arXiv:2303.08810",
        "paper_name": "BiFormer: Vision Transformer with Bi-Level Routing Attention",
        "origin_url": "https://github.com/rayleizhu/BiFormer",
        **kwargs,
    }


# Official ImageNet-1k checkpoints as published in BiFormer:models/biformer.py (OneDrive shares; users report them
# unreachable; the README later pointed to matix.li short links). Checkpoint files hold {"model": state_dict, ...}.
default_cfgs = generate_default_cfgs(
    {
        "biformer_tiny.in1k": _cfg(
            url="https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvChHEOoGkgwgQzEDlM/root/content"
        ),
        "biformer_small.in1k": _cfg(
            url="https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvChHDyM-x9KWRBZ832/root/content"
        ),
        "biformer_base.in1k": _cfg(
            url="https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvChHI_XPhoadjaNxtO/root/content"
        ),
    }
)


@register_model
def biformer_tiny(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-T: depths 2-2-8-2, dims 64-128-256-512 (13.1M params)."""
    model_args = dict(depths=(2, 2, 8, 2), dims=(64, 128, 256, 512))
    return _create_biformer("biformer_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def biformer_small(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-S: depths 4-4-18-4, dims 64-128-256-512 (25.5M params)."""
    model_args = dict(depths=(4, 4, 18, 4), dims=(64, 128, 256, 512))
    return _create_biformer("biformer_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def biformer_base(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-B: depths 4-4-18-4, dims 96-192-384-768 (56.8M params)."""
    model_args = dict(depths=(4, 4, 18, 4), dims=(96, 192, 384, 768))
    return _create_biformer("biformer_base", pretrained=pretrained, **dict(model_args, **kwargs))
