"""RMT (Fan et al., CVPR 2024, "RMT: Retentive Networks Meet Vision Transformers"), and the network PPMA builds on it.

Four stages on channels-last maps: a deep conv stem (four 3x3 convs with BatchNorm, strides 2-1-2-1), 3x3 stride-2
conv + BatchNorm downsampling, and pre-norm blocks ``x += DWConv3x3(x); x += MaSA(LN(x)); x += FFN(LN(x))``
(LayerNorm eps 1e-6; FFN ``fc1 -> GELU -> h + DWConv3x3(h) -> fc2``; layer scale in the last two stages of the base
and large models). MaSA is Manhattan self-attention (:class:`attnzoo.layers.ManhattanAttention`: decay
``gamma_h ** (|dx| + |dy|)``, rotary embedding, 5x5 depth-wise conv of the values), decomposed along rows and columns
in the early stages (``decomposed``). The head projects every position to 1024 channels (Linear + BatchNorm +
SiLU) before average pooling and the classifier (:class:`ProjectionClassifierHead`). There is no final norm.

``mixer="polyline"`` swaps MaSA for PPMA's polyline path masked attention (:mod:`attnzoo.ppma`). Any input size works
(every mixer takes any ``H, W``). :func:`checkpoint_filter_fn` loads the official checkpoints of both families
(``patch_embed``, ``layers.i.blocks.j.retention.{q,k,v}_proj``, ``gamma_1``, ``layers.i.downsample``, ``proj``,
``norm``, ``head``); the official ``Relpos`` buffers are checked against the model's decays and dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import partial

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm, get_device_dtype
from timm.models import generate_default_cfgs, register_model

from attnzoo.layers import (
    ConvDownsample,
    DeepConvStem,
    DWConvMlp,
    HierarchicalVisionTransformer,
    ManhattanAttention,
    SimPoolClassifierHead,
    TransformerBlock,
    build_stages,
    create_mixer,
)
from attnzoo.weights import build_model_with_official_weights, unwrap_state_dict
from attnzoo.weights.downstream import OUT_NORMS, add_new_output_norms

__all__ = ["RMT", "ProjectionClassifierHead", "checkpoint_filter_fn"]

DECAY_MIXERS = ("manhattan", "polyline")


class ProjectionClassifierHead(SimPoolClassifierHead):
    """``Linear(in_features, hidden_size) -> BatchNorm -> SiLU`` at every position of a ``(B, H, W, C)`` map, then
    global pooling (any timm pool type or ``"simpool"``) and the classifier; ``pre_logits`` is the pooled
    ``hidden_size`` vector.

    ``reset(..., in_features=)`` with another width (a pruned backbone) or ``reset_other=True`` removes the projection,
    so pooling and the classifier act on the input itself.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden_size: int = 1024,
        pool_type: str = "avg",
        drop_rate: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        dd = {"device": device, "dtype": dtype}
        super().__init__(hidden_size, num_classes, pool_type=pool_type, drop_rate=drop_rate, input_fmt="NHWC", **dd)
        self.proj_in_features: int | None = in_features
        self.proj = nn.Linear(in_features, hidden_size, **dd)
        self.norm = nn.BatchNorm2d(hidden_size, **dd)
        self.act = nn.SiLU()

    def reset(
        self,
        num_classes: int,
        pool_type: str | None = None,
        reset_other: bool = False,
        in_features: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        changed = in_features is not None and in_features != self.proj_in_features
        if self.proj_in_features is not None and (reset_other or changed):
            if in_features is None:
                in_features = self.proj_in_features
            self.proj, self.norm, self.act = nn.Identity(), nn.Identity(), nn.Identity()
            self.proj_in_features = None
        elif self.proj_in_features is not None:
            in_features = self.in_features  # the projection stays: pool and classify its output
        super().reset(num_classes, pool_type, in_features=in_features, **get_device_dtype(self, device, dtype))

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``x``: ``(B, H, W, in_features)``. Returns logits ``(B, num_classes)`` (or pooled features)."""
        x = self.act(self.norm(self.proj(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        x = self.drop(self.global_pool(x))
        if pre_logits:
            return self.flatten(x)
        return self.flatten(self.fc(x))


class RMT(HierarchicalVisionTransformer):
    """RMT / PPMA backbone and classifier (see the module docstring).

    Args:
        depths, dims, num_heads, mlp_ratios: blocks, width, heads and MLP ratio of each stage.
        mixer: ``"manhattan"`` (RMT) or ``"polyline"`` (PPMA).
        decomposed: per stage, attend along rows then columns (True) or over the whole map (False).
        init_values, heads_ranges: per stage, the Manhattan decays (``"manhattan"`` only).
        layer_scale_init_values: per stage, initial layer scale (``None``: no layer scale).
        head_hidden_size: width of the head's per-position projection.
        gate: output gate of every mixer (``"none"`` as published).
        drop_path_rate: stochastic depth, rising linearly over all blocks.
        out_norms: add a LayerNorm (eps 1e-5) on each stage output, applied to the maps ``forward_intermediates`` /
            ``features_only`` return only (the official PPMA detection backbone's ``outnorm{i}``).
    """

    def __init__(
        self,
        depths: Sequence[int] = (2, 2, 8, 2),
        dims: Sequence[int] = (64, 128, 256, 512),
        num_heads: Sequence[int] = (4, 4, 8, 16),
        mlp_ratios: Sequence[float] = (3.0, 3.0, 3.0, 3.0),
        mixer: str = "manhattan",
        decomposed: Sequence[bool] = (True, True, False, False),
        init_values: Sequence[float] = (2.0, 2.0, 2.0, 2.0),
        heads_ranges: Sequence[float] = (4.0, 4.0, 6.0, 6.0),
        layer_scale_init_values: Sequence[float | None] = (None, None, None, None),
        head_hidden_size: int = 1024,
        gate: str = "none",
        drop_path_rate: float = 0.0,
        out_norms: bool = False,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        dd = {"device": device, "dtype": dtype}
        if mixer not in DECAY_MIXERS:
            raise ValueError(f"mixer must be one of {DECAY_MIXERS}, got {mixer!r}")
        per_stage = dict(
            num_heads=num_heads,
            mlp_ratios=mlp_ratios,
            decomposed=decomposed,
            init_values=init_values,
            heads_ranges=heads_ranges,
            layer_scale_init_values=layer_scale_init_values,
        )
        for name, values in per_stage.items():
            if len(values) != len(depths) or len(dims) != len(depths):
                raise ValueError(f"{name} and dims need one entry per stage ({len(depths)}), got {list(values)}")
        norm_layer = partial(LayerNorm, eps=1e-6)

        def make_block(i: int, j: int, drop_path: float) -> TransformerBlock:
            kind_args = dict(init_value=init_values[i], heads_range=heads_ranges[i]) if mixer == "manhattan" else {}
            attn = create_mixer(
                mixer, dims[i], num_heads=num_heads[i], decomposed=decomposed[i], gate=gate, **kind_args, **dd
            )
            return TransformerBlock(
                dims[i],
                attn,
                mlp_ratio=mlp_ratios[i],
                drop_path=drop_path,
                layer_scale_init_value=layer_scale_init_values[i],
                cpe_kernel_size=3,
                norm_layer=norm_layer,
                mlp_layer=DWConvMlp,
                **dd,
            )

        def make_downsample(i: int) -> nn.Module | None:
            return ConvDownsample(dims[i - 1], dims[i], bias=True, norm_layer=nn.BatchNorm2d, **dd) if i else None

        stem = DeepConvStem(in_chans, dims[0], **dd)
        stages = build_stages(depths, make_block, make_downsample, drop_path_rate)
        super().__init__(
            stem,
            stages,
            dims,
            norm_layer=None,
            out_norm_layer=partial(nn.LayerNorm, eps=1e-5) if out_norms else None,
            num_classes=num_classes,
            global_pool=global_pool,
            in_chans=in_chans,
            drop_rate=drop_rate,
            **dd,
        )
        self.head = ProjectionClassifierHead(
            self.num_features, num_classes, head_hidden_size, pool_type=global_pool, drop_rate=drop_rate, **dd
        )
        self.head.apply(self._init_linear)
        self.head_hidden_size = self.head.num_features

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """As :meth:`HierarchicalVisionTransformer.prune_intermediate_layers`; pruning the head also removes its
        per-position projection (as timm's MobileNetV3 removes its ``conv_head``)."""
        take_indices = super().prune_intermediate_layers(indices, prune_norm, prune_head)
        if prune_head:
            self.head.reset(0, "", reset_other=True)
            self.head_hidden_size = self.head.num_features
        return take_indices


_BLOCK_RENAMES = (
    ("pos.conv.", "pos_embed."),
    ("retention_layer_norm.", "norm1."),
    ("final_layer_norm.", "norm2."),
    ("retention.lepe.conv.", "attn.lepe."),
    ("retention.out_proj.", "attn.proj."),
    ("retention.path_embed.dt_linear.", "attn.dt_proj."),
    ("retention.path_embed.", "attn."),
    ("ffn.dwconv.conv.", "mlp.dwconv."),
    ("ffn.", "mlp."),
)
_HEAD_RENAMES = (("proj.", "head.proj."), ("norm.", "head.norm."), ("head.", "head.fc."))


def _check_decays(stage: int, decay: torch.Tensor, model: RMT) -> None:
    """The official ``Relpos.decay`` buffer of stage ``stage`` must equal the model's Manhattan decays."""
    attn = model.stages[stage].blocks[0].attn if stage < len(model.stages) else None
    if not isinstance(attn, ManhattanAttention):
        raise ValueError(f"checkpoint has RMT decays for stage {stage}, but the model has no Manhattan attention there")
    expected = attn.log_gamma(torch.device("cpu"))
    if decay.shape != expected.shape or not torch.allclose(decay.float().cpu(), expected, rtol=1e-5, atol=1e-6):
        raise ValueError(
            f"checkpoint's stage-{stage} decays {decay.tolist()} differ from the model's {expected.tolist()} "
            "(init_values / heads_ranges / num_heads of another model?)"
        )


def _convert_official(state_dict: Mapping[str, torch.Tensor], model: RMT) -> dict[str, torch.Tensor]:
    """Official RMT / PPMA keys -> attnzoo keys (the downsampling that ends official layer i starts stage i + 1)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key.startswith("patch_embed."):
            out["stem." + key[len("patch_embed.") :]] = value
        elif match := re.match(r"outnorm(\d+)\.(.*)", key):  # downstream backbone output norms
            out[f"{OUT_NORMS}{match.group(1)}.{match.group(2)}"] = value
        elif match := re.match(r"layers\.(\d+)\.Relpos\.(\w+)", key):
            if match.group(2) == "decay":
                _check_decays(int(match.group(1)), value, model)
        elif match := re.match(r"layers\.(\d+)\.downsample\.(.*)", key):
            out[f"stages.{int(match.group(1)) + 1}.downsample.{match.group(2)}"] = value
        elif match := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.(.*)", key):
            prefix, rest = f"stages.{match.group(1)}.blocks.{match.group(2)}.", match.group(3)
            if projection := re.match(r"retention\.([qkv])_proj\.(weight|bias)", rest):
                qkv.setdefault(prefix + "attn.qkv." + projection.group(2), {})[projection.group(1)] = value
            elif rest in ("gamma_1", "gamma_2"):
                out[prefix + f"ls{rest[-1]}.gamma"] = value.reshape(-1)
            else:
                for old, new in _BLOCK_RENAMES:
                    if rest.startswith(old):
                        rest = new + rest[len(old) :]
                        break
                out[prefix + rest] = value
        else:
            for old, new in _HEAD_RENAMES:
                if key.startswith(old):
                    key = new + key[len(old) :]
                    break
            out[key] = value
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"checkpoint has an incomplete q/k/v projection set for {key}: {sorted(parts)}")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def checkpoint_filter_fn(state_dict: Mapping, model: RMT, new_output_norms: bool = True) -> dict[str, torch.Tensor]:
    """Map an official RMT / PPMA checkpoint (classification or PPMA detection backbone; bare, or wrapped as
    ``{"model": ...}`` / ``{"models": ...}``) onto attnzoo's keys; attnzoo state dicts pass unchanged.
    ``new_output_norms``: a model with output norms gets its own (untrained) ones when the checkpoint has none
    (:func:`~attnzoo.weights.downstream.add_new_output_norms`)."""
    state_dict = unwrap_state_dict(state_dict)
    if any(k.startswith(("patch_embed.", "layers.")) for k in state_dict):
        state_dict = _convert_official(state_dict, model)
    return add_new_output_norms(state_dict, model) if new_output_norms else state_dict


def create_rmt(variant: str, pretrained: bool = False, **kwargs) -> RMT:
    """Build the registered RMT / PPMA ``variant`` (official checkpoints through :func:`checkpoint_filter_fn`)."""
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_official_weights(
        RMT,
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
        "license": "other",
        "paper_ids": "arXiv:2309.11523",
        "paper_name": "RMT: Retentive Networks Meet Vision Transformers",
        "origin_url": "https://github.com/qhfan/RMT",
        **kwargs,
    }


def _baidu(link: str, code: str) -> tuple[str, ...]:
    return (
        f"official ImageNet-1k checkpoint: Baidu Netdisk {link} (extraction code {code}); no direct URL, so load the "
        "downloaded file with pretrained_cfg_overlay=dict(file=...) or `attnzoo convert`",
        "the authors state no licence (the repository has no LICENSE file)",
    )


# The official ImageNet-1k checkpoints are Baidu Netdisk shares (RMT README); the token-labelling models (RMT-S*,
# B*, L*) are other architectures and not registered.
default_cfgs = generate_default_cfgs(
    {
        "rmt_tiny.in1k": _cfg(notes=_baidu("https://pan.baidu.com/s/1uTSCuPqYRNmT4Zb4Je9BOw", "vsyv")),
        "rmt_small.in1k": _cfg(notes=_baidu("https://pan.baidu.com/s/1aQeErkmy191-zshlW2bT0g", "3ay4")),
        "rmt_base.in1k": _cfg(notes=_baidu("https://pan.baidu.com/s/1ZDNl_broia_fvvlEoTaFhA", "yzge")),
        "rmt_large.in1k": _cfg(notes=_baidu("https://pan.baidu.com/s/1v7QWgAh0TulWOTg4d94KHw", "uewu")),
    }
)

# Official configs (RMT:classfication_release/RMT.py: RMT_T3, RMT_S, RMT_M2, RMT_L6); the published "B" and "L" are
# M2 and L6.
RMT_TINY = dict(
    depths=(2, 2, 8, 2),
    dims=(64, 128, 256, 512),
    num_heads=(4, 4, 8, 16),
    mlp_ratios=(3.0, 3.0, 3.0, 3.0),
    decomposed=(True, True, False, False),
    heads_ranges=(4.0, 4.0, 6.0, 6.0),
    drop_path_rate=0.1,
)
RMT_SMALL = dict(
    depths=(3, 4, 18, 4),
    dims=(64, 128, 256, 512),
    num_heads=(4, 4, 8, 16),
    mlp_ratios=(4.0, 4.0, 3.0, 3.0),
    decomposed=(True, True, True, False),
    heads_ranges=(4.0, 4.0, 6.0, 6.0),
    drop_path_rate=0.15,
)
RMT_BASE = dict(
    depths=(4, 8, 25, 8),
    dims=(80, 160, 320, 512),
    num_heads=(5, 5, 10, 16),
    mlp_ratios=(4.0, 4.0, 3.0, 3.0),
    decomposed=(True, True, True, False),
    heads_ranges=(5.0, 5.0, 6.0, 6.0),
    layer_scale_init_values=(None, None, 1e-6, 1e-6),
    drop_path_rate=0.4,
)
RMT_LARGE = dict(
    depths=(4, 8, 25, 8),
    dims=(112, 224, 448, 640),
    num_heads=(7, 7, 14, 20),
    mlp_ratios=(4.0, 4.0, 3.0, 3.0),
    decomposed=(True, True, True, False),
    heads_ranges=(6.0, 6.0, 6.0, 6.0),
    layer_scale_init_values=(None, None, 1e-6, 1e-6),
    drop_path_rate=0.5,
)


@register_model
def rmt_tiny(pretrained: bool = False, **kwargs) -> RMT:
    """RMT-T: depths 2-2-8-2, dims 64-512, heads 4-4-8-16, decomposed MaSA in stages 1-2 (14.33M params)."""
    return create_rmt("rmt_tiny", pretrained=pretrained, **{**RMT_TINY, **kwargs})


@register_model
def rmt_small(pretrained: bool = False, **kwargs) -> RMT:
    """RMT-S: depths 3-4-18-4, dims 64-512, decomposed MaSA in stages 1-3 (26.97M params)."""
    return create_rmt("rmt_small", pretrained=pretrained, **{**RMT_SMALL, **kwargs})


@register_model
def rmt_base(pretrained: bool = False, **kwargs) -> RMT:
    """RMT-B: depths 4-8-25-8, dims 80-512, layer scale 1e-6 in stages 3-4 (54.15M params)."""
    return create_rmt("rmt_base", pretrained=pretrained, **{**RMT_BASE, **kwargs})


@register_model
def rmt_large(pretrained: bool = False, **kwargs) -> RMT:
    """RMT-L: depths 4-8-25-8, dims 112-640, layer scale 1e-6 in stages 3-4 (95.46M params)."""
    return create_rmt("rmt_large", pretrained=pretrained, **{**RMT_LARGE, **kwargs})
