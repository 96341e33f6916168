"""Dense-prediction backbones from zoo classifiers (detection and segmentation): multi-scale maps, optionally
through a feature pyramid, as torchvision detectors and the segmentation decoders want them.

- Hierarchical models (NAT, DiNAT, BiFormer, Agent-PVT/Swin, MetaPool...): ``timm.create_model(name,
  features_only=True)`` gives the stage maps (strides 4-32); ``torchvision.ops.FeaturePyramidNetwork`` turns them
  into ``fpn_channels``-wide levels, plus ``LastLevelMaxPool`` (R-CNN), ``LastLevelP6P7`` on the last stage map
  (RetinaNet / FCOS) or no extra level (Semantic FPN). ``fpn_channels=None`` returns the raw stage maps (UperNet).
- Plain ViTs (gated ViT, Agent-DeiT, ToMe models): the last block's map (stride 16; ToMe models return it unmerged)
  goes through ViTDet's simple feature pyramid (Li et al., 2022): 2x2 transposed convolutions up to strides 8 and 4,
  a 2x2 max-pool down to stride 32, and a 1x1 conv + LayerNorm + 3x3 conv + LayerNorm on every level
  (``fpn_channels=None``: as wide as the ViT).

Both return an ``OrderedDict`` of ``(B, C_i, H / s, W / s)`` maps and carry ``channels`` (the ``C_i``) and
``out_channels`` (the pyramid width; ``None`` for raw stage maps), so any ``torchvision.models.detection`` model
accepts them.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import LayerNorm2d
from timm.models._features import FeatureGetterNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.ops.feature_pyramid_network import (
    ExtraFPNBlock,
    FeaturePyramidNetwork,
    LastLevelMaxPool,
    LastLevelP6P7,
)

import attnzoo  # noqa: F401  (registers the zoo models into timm)
from attnzoo.weights.downstream import filter_without_new_norms, new_output_norm_keys, warn_new_keys, zoo_filter
from attnzoo.weights.io import load_state_dict_file

__all__ = [
    "FeatureBackbone",
    "SimpleFeaturePyramid",
    "ViTDetBackbone",
    "build_backbone",
    "is_plain_vit",
    "load_backbone_weights",
]


def is_plain_vit(name: str, **kwargs) -> bool:
    """Whether timm model ``name`` is a plain (single-scale) ViT; built on the meta device, so it costs no memory."""
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    return isinstance(model, VisionTransformer)


def _pretrained_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Backbone weights from a classification checkpoint: a Lightning ``.ckpt`` of the classification recipe
    (``model.*`` keys; the EMA copy is left out), an exported folder (``model.safetensors``) or a weights file."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"pretrained_backbone: no model.safetensors in the folder {path.parent}")
    if not path.is_file():
        raise FileNotFoundError(f"pretrained_backbone: weights file {str(path)!r} not found")
    state = load_state_dict_file(path)
    if any(k.startswith("model.") for k in state):  # ImageClassifier checkpoint: keep the raw model's weights
        state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    return state


def load_backbone_weights(
    body: nn.Module, path: str | os.PathLike, name: str, model_kwargs: Mapping[str, Any] | None = None
) -> list[str]:
    """Load classification weights into a backbone, strictly; returns the tensors that start untrained.

    Args:
        body: the ``features_only`` net (or the model itself) of timm model ``name`` built with ``model_kwargs``,
            e.g. a downstream backbone (``out_norms=True``, ``downstream_agent_shapes=...``).
        path: a classification recipe checkpoint (Lightning ``.ckpt``), an exported folder or a weights file, in
            attnzoo's keys or the family's official classification layout (mapped by its ``checkpoint_filter_fn``;
            agent biases and position embeddings are resampled to the model).

    Every tensor the backbone keeps must come from the file, except the output norms of a downstream backbone when
    the file has none (they start untrained; a warning names them). The file may hold more only where
    ``features_only`` pruned the model: the classifier, the final norm, and the stages after the last of
    ``out_indices``. Anything else (a larger or smaller sibling, another width) is a ``ValueError`` naming the
    tensors. Shared by the detection and segmentation recipes.
    """
    model = body.model if isinstance(body, FeatureGetterNet) else body
    state = _pretrained_state_dict(path)
    if any(k.startswith("backbone.") for k in state):
        raise ValueError(
            f"pretrained_backbone {str(path)!r} is a detection / segmentation checkpoint (backbone.* keys), not "
            "classification weights; map its backbone with attnzoo.weights.downstream.convert_backbone_state"
        )
    state = filter_without_new_norms(zoo_filter(name), state, model)
    with torch.device("meta"):
        full = timm.create_model(name, pretrained=False, **dict(model_kwargs or {}))
    expected = model.state_dict()
    pruned = set(full.state_dict()) - set(expected)
    classifier = model.pretrained_cfg.get("classifier")
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    extra = sorted(
        k
        for k in state
        if k not in expected and k not in pruned and not k.startswith(tuple(c + "." for c in classifiers))
    )
    new = new_output_norm_keys(state, model)
    missing = sorted(k for k in expected if k not in state and k not in new)
    mismatched = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    )
    if extra or missing or mismatched:
        problems = [
            f"{len(keys)} {what}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
            for keys, what in (
                (extra, f"tensors that {name} does not have"),
                (missing, "backbone tensors missing"),
                (mismatched, "shapes differ"),
            )
            if keys
        ]
        raise ValueError(
            f"pretrained_backbone {str(path)!r} does not fit {name}: {'; '.join(problems)}. Only the classifier and "
            "the final norm may differ (is it a checkpoint of another size, or were other backbone kwargs used?)"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    warn_new_keys(new, repr(str(path)))
    return new


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


EXTRA_LEVELS = {"maxpool": 1, "p6p7": 2, "p6p7_on_input": 2, None: 0}  # levels added above the last map


def _extra_block(extra: str | None, in_channels: int, out_channels: int) -> ExtraFPNBlock | None:
    """The levels above the last map: a stride-2 max-pool of it (``"maxpool"``), P6/P7 convolutions on the last
    backbone map (``"p6p7"``: torchvision's, on the pyramid's last level when ``in_channels == out_channels`` and a
    ReLU before P7) or mmdet's (``"p6p7_on_input"``: always on the backbone map, no ReLU), or none (``None``)."""
    if extra is None:
        return None
    if extra == "maxpool":
        return LastLevelMaxPool()
    if extra == "p6p7_on_input":
        from .mmdet_ops import LastLevelP6P7OnInput

        return LastLevelP6P7OnInput(in_channels, out_channels)
    return LastLevelP6P7(in_channels, out_channels)


class _TimmBody(nn.Module):
    """Shared frozen-stage / frozen-norm logic of the two backbones; ``self.body`` is a timm feature net whose
    ``model`` is the (pruned) classifier."""

    body: nn.Module

    def _setup_freezing(self, units: list[str], frozen_stages: int, norm_eval: bool) -> None:
        """Freeze every parameter registered before unit ``frozen_stages`` (the stem and the first ``frozen_stages``
        units: stages of hierarchical models, blocks of plain ViTs); ``-1`` freezes nothing."""
        if frozen_stages < -1 or frozen_stages > len(units):
            raise ValueError(f"frozen_stages must be in [-1, {len(units)}], got {frozen_stages}")
        self.norm_eval = norm_eval
        names = [n for n, _ in self.body.model.named_parameters()]
        if frozen_stages >= 0:
            if frozen_stages == len(units):
                cut = len(names)
            else:
                prefix = units[frozen_stages] + "."
                cut = next(i for i, n in enumerate(names) if n.startswith(prefix))
            frozen = set(names[:cut])
            for name, p in self.body.model.named_parameters():
                if name in frozen:
                    p.requires_grad_(False)
        if norm_eval:
            for m in self.body.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    _freeze(m)

    def train(self, mode: bool = True) -> _TimmBody:
        """``norm_eval``: batch norms of the backbone stay in eval mode (running statistics frozen)."""
        super().train(mode)
        if mode and self.norm_eval:
            for m in self.body.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


class FeatureBackbone(_TimmBody):
    """A hierarchical timm model's stage maps + FPN (``out_channels=None``: the stage maps themselves).

    ``forward``: images ``(B, 3, H, W)`` -> ``OrderedDict`` of ``(B, out_channels, H / s, W / s)`` (without FPN:
    ``(B, channels[i], H / s, W / s)``) for the strides ``s`` of ``out_indices`` (only those >= ``min_stride``),
    then the extra levels.
    """

    def __init__(
        self,
        body: nn.Module,
        out_channels: int | None,
        extra: str | None,
        frozen_stages: int = -1,
        norm_eval: bool = False,
        min_stride: int = 4,
    ) -> None:
        super().__init__()
        self.body = body
        channels, strides = body.feature_info.channels(), body.feature_info.reduction()
        self.keep = [i for i, s in enumerate(strides) if s >= min_stride]
        if not self.keep:
            raise ValueError(f"out_indices give strides {strides}; at least one must be >= {min_stride}")
        self.strides = [strides[i] for i in self.keep]
        in_channels = [channels[i] for i in self.keep]
        if out_channels is None:
            if extra is not None:
                raise ValueError(f"extra levels ({extra!r}) need a pyramid: set fpn_channels")
            self.fpn, self.channels = None, in_channels
        else:
            self.fpn = FeaturePyramidNetwork(
                in_channels, out_channels, extra_blocks=_extra_block(extra, in_channels[-1], out_channels)
            )
            self.channels = [out_channels] * (len(in_channels) + EXTRA_LEVELS[extra])
        self.out_channels = out_channels
        self.num_extra = EXTRA_LEVELS[extra]
        units = [info["module"] for info in body.feature_info.info]
        self._setup_freezing(units, frozen_stages, norm_eval)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = self.body(x)
        levels = OrderedDict((str(k), maps[i]) for k, i in enumerate(self.keep))
        return levels if self.fpn is None else self.fpn(levels)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's pyramid from one stride-16 map ``(B, C, h, w)``: maps ``(B, out_channels, 4h / s, 4w / s)`` for
    each ``s`` of ``strides`` (a subset of 4, 8, 16, 32)."""

    def __init__(self, in_channels: int, out_channels: int, strides: Sequence[int] = (4, 8, 16, 32)) -> None:
        super().__init__()
        if not set(strides) <= {4, 8, 16, 32}:
            raise ValueError(f"strides must be among 4, 8, 16, 32, got {list(strides)}")
        self.strides = list(strides)
        self.scales = nn.ModuleList()
        self.outputs = nn.ModuleList()
        for s in self.strides:
            if s == 4:
                half = in_channels // 2
                scale = nn.Sequential(
                    nn.ConvTranspose2d(in_channels, half, 2, stride=2),
                    LayerNorm2d(half),
                    nn.GELU(),
                    nn.ConvTranspose2d(half, in_channels // 4, 2, stride=2),
                )
                width = in_channels // 4
            elif s == 8:
                scale, width = nn.ConvTranspose2d(in_channels, in_channels // 2, 2, stride=2), in_channels // 2
            elif s == 16:
                scale, width = nn.Identity(), in_channels
            else:
                scale, width = nn.MaxPool2d(2, stride=2), in_channels
            self.scales.append(scale)
            self.outputs.append(
                nn.Sequential(
                    nn.Conv2d(width, out_channels, 1, bias=False),
                    LayerNorm2d(out_channels),
                    nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                    LayerNorm2d(out_channels),
                )
            )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [out(scale(x)) for scale, out in zip(self.scales, self.outputs)]


class ViTDetBackbone(_TimmBody):
    """A plain ViT's last block map (stride 16) + :class:`SimpleFeaturePyramid` + the extra levels.

    ``forward``: images ``(B, 3, H, W)`` -> ``OrderedDict`` of ``(B, out_channels, ceil(H / s), ceil(W / s))``
    (``out_channels=None``: the ViT's width).
    """

    def __init__(
        self,
        body: nn.Module,
        out_channels: int | None,
        extra: str | None,
        frozen_stages: int = -1,
        norm_eval: bool = False,
        min_stride: int = 4,
    ) -> None:
        super().__init__()
        self.body = body
        (stride,) = set(body.feature_info.reduction())
        if stride != 16:
            raise ValueError(f"the simple feature pyramid needs a stride-16 ViT (patch size 16), got stride {stride}")
        strides = [s for s in (4, 8, 16, 32) if s >= min_stride]
        width = body.feature_info.channels()[-1]
        out_channels = width if out_channels is None else out_channels
        self.pyramid = SimpleFeaturePyramid(width, out_channels, strides)
        self.extra = _extra_block(extra, out_channels, out_channels)
        self.strides, self.out_channels = strides, out_channels
        self.num_extra = EXTRA_LEVELS[extra]
        self.channels = [out_channels] * (len(strides) + self.num_extra)
        units = [f"blocks.{i}" for i in range(len(body.model.blocks))]
        self._setup_freezing(units, frozen_stages, norm_eval)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = self.pyramid(self.body(x)[-1])
        names = [str(k) for k in range(len(maps))]
        if self.extra is not None:
            maps, names = self.extra(maps, maps, names)
        return OrderedDict(zip(names, maps))


def build_backbone(
    name: str,
    *,
    extra: str | None = "maxpool",
    pretrained: bool | str | os.PathLike = False,
    out_indices: Sequence[int] = (0, 1, 2, 3),
    fpn_channels: int | None = 256,
    frozen_stages: int = -1,
    norm_eval: bool = False,
    min_stride: int = 4,
    **model_kwargs,
) -> FeatureBackbone | ViTDetBackbone:
    """Backbone + pyramid for timm model ``name`` (``extra``: ``"maxpool"`` adds a stride-2x level by max-pooling,
    ``"p6p7"`` / ``"p6p7_on_input"`` two conv levels, ``None`` none); levels with stride < ``min_stride`` are left
    out. ``fpn_channels=None``: a hierarchical model's stage maps without FPN (a plain ViT's simple pyramid keeps the
    ViT's width). ``pretrained``: ``True`` loads the model's cfg weights, a path loads a classification checkpoint
    or exported folder (classifier dropped)."""
    if extra not in EXTRA_LEVELS:
        raise ValueError(f"extra must be 'maxpool', 'p6p7', 'p6p7_on_input' or None, got {extra!r}")
    if fpn_channels is not None and fpn_channels < 1:
        raise ValueError(f"fpn_channels must be positive or None, got {fpn_channels}")
    if not timm.is_model(name):
        from attnzoo.recipes.module import check_model_name

        check_model_name(name)
    if isinstance(pretrained, (str, os.PathLike)) and not str(pretrained):
        pretrained = False
    from_file = pretrained if isinstance(pretrained, (str, os.PathLike)) else None
    try:
        plain = is_plain_vit(name, **model_kwargs)
        indices: int | tuple[int, ...] = 1 if plain else tuple(out_indices)
        body = timm.create_model(
            name,
            pretrained=pretrained is True,
            features_only=True,
            feature_cls="getter",
            out_indices=indices,
            **model_kwargs,
        )
    except TypeError as err:
        raise TypeError(f"backbone kwargs {sorted(model_kwargs)} rejected by {name}: {err}") from err
    if from_file is not None:
        load_backbone_weights(body, from_file, name, model_kwargs)
    cls = ViTDetBackbone if plain else FeatureBackbone
    backbone = cls(body, fpn_channels, extra, frozen_stages, norm_eval, min_stride)
    backbone.pretrained_cfg = body.model.pretrained_cfg
    return backbone
