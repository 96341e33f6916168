"""Released mmseg checkpoints (UperNet, Semantic FPN) onto :class:`~attnzoo.recipes.segmentation.SemanticSegmenter`.

mmseg layout -> the module's state-dict keys:

- ``backbone.*`` (the family's official downstream layout) -> ``model.backbone.body.model.*`` through
  :func:`attnzoo.weights.downstream.convert_backbone_state`;
- ``decode_head.*``, ``auxiliary_head.*`` (mmseg's ``UPerHead`` / ``FPNHead`` / ``FCNHead``: mmcv ``ConvModule``
  ``conv`` / ``bn``, classifier ``conv_seg``) -> ``model.decode_head.*``, ``model.auxiliary_head.*`` (same names);
- ``neck.lateral_convs.i.conv.*`` / ``neck.fpn_convs.i.conv.*`` (Semantic FPN's FPN) ->
  ``model.backbone.fpn.inner_blocks.i.0.*`` / ``model.backbone.fpn.layer_blocks.i.0.*`` (torchvision's FPN).

Strict: a checkpoint key that maps onto nothing, a module tensor the checkpoint lacks, or a shape mismatch is a
``ValueError`` naming them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["map_state_dict"]

_NECK = re.compile(r"^neck\.(lateral_convs|fpn_convs)\.(\d+)\.conv\.(weight|bias)$")
_NECK_TARGET = {"lateral_convs": "inner_blocks", "fpn_convs": "layer_blocks"}
_HEADS = ("decode_head.", "auxiliary_head.")


def _listing(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def map_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of a released mmseg checkpoint (``state``: its ``state_dict``, keys ``backbone.*``,
    ``decode_head.*``, ``auxiliary_head.*``, ``neck.*``) under the state-dict keys of ``module`` (a
    ``SemanticSegmenter`` built with the checkpoint's decoder, backbone, downstream backbone kwargs and
    ``num_classes``); ``module.load_state_dict(result, strict=True)`` then loads it."""
    from .downstream import convert_backbone_state

    segmenter = module.model
    own = module.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}  # module key -> checkpoint key
    unknown: list[str] = []
    backbone = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    for key, value in state.items():
        if key.startswith("backbone."):
            continue
        if key.startswith(_HEADS):
            target = "model." + key
        elif match := _NECK.match(key):
            kind, index, param = match.groups()
            target = f"model.backbone.fpn.{_NECK_TARGET[kind]}.{index}.0.{param}"
        else:
            unknown.append(key)
            continue
        mapped[target], source[target] = value, key
    if backbone:
        name = module.hparams.backbone
        converted = convert_backbone_state(name, backbone, segmenter.backbone.body)
        mapped.update({"model.backbone.body." + k: v for k, v in converted.items()})
    leftover = sorted(unknown + [source.get(k, k) for k in mapped if k not in own])
    missing = sorted(k for k in own if k not in mapped)
    mismatched = sorted(
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in mapped.items()
        if k in own and v.shape != own[k].shape
    )
    if leftover or missing or mismatched:
        problems = []
        if leftover:
            problems.append(f"{len(leftover)} checkpoint tensors map onto nothing: {_listing(leftover)}")
        if missing:
            problems.append(f"{len(missing)} module tensors are not in the checkpoint: {_listing(missing)}")
        if mismatched:
            problems.append(f"{len(mismatched)} shapes differ (num_classes? channels?): {_listing(mismatched)}")
        raise ValueError(
            f"the mmseg checkpoint does not fit this {segmenter.decoder} on {module.hparams.backbone}: "
            + "; ".join(problems)
        )
    return mapped
