"""AdamW parameter groups of the dense-prediction recipes (detection, segmentation): a timm backbone inside a
larger model (pyramid, heads). Two rules:

- :func:`dense_param_groups` (timm's): no weight decay on 1-D parameters (norms, biases) and on the backbone's
  ``no_weight_decay()`` names (position tables, relative-position biases); optional layer-wise lr decay.
- :func:`keyword_param_groups` (mmcv's ``paramwise_cfg.custom_keys`` with ``decay_mult=0``, as the papers'
  mmdet / mmseg configs): no weight decay where the parameter name contains one of the keys, decay everywhere else
  (biases and norms included).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn

__all__ = ["dense_param_groups", "keyword_param_groups"]


def dense_param_groups(
    model: nn.Module,
    backbone: nn.Module,
    lr: float,
    weight_decay: float,
    backbone_lr_mult: float = 1.0,
    layer_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Groups of the trainable parameters of ``model``: the timm model ``backbone``'s (timm's weight-decay grouping,
    or its layer-wise lr decay through ``group_matcher`` when ``layer_decay`` is set; lr ``lr * backbone_lr_mult *
    lr_scale``) and the rest (lr ``lr``). No weight decay on 1-D parameters, biases and the backbone's
    ``no_weight_decay()`` names."""
    skip = sorted(backbone.no_weight_decay()) if hasattr(backbone, "no_weight_decay") else []
    # keywords: timm 1.0.31 put ``weight_decay_exclude_1d`` third in ``param_groups_weight_decay``
    if layer_decay is not None:
        groups = param_groups_layer_decay(
            backbone, weight_decay=weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay
        )
    else:
        groups = param_groups_weight_decay(backbone, weight_decay=weight_decay, no_weight_decay_list=skip)
    for group in groups:
        group["lr"] = lr * backbone_lr_mult * group.get("lr_scale", 1.0)
    inner = {id(p) for p in backbone.parameters()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if id(p) in inner or not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    head = [
        {"params": decay, "weight_decay": weight_decay, "lr": lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr},
    ]
    return [g for g in groups + head if g["params"]]


def keyword_param_groups(
    model: nn.Module,
    backbone: nn.Module,
    lr: float,
    weight_decay: float,
    backbone_lr_mult: float,
    no_decay_keys: Sequence[str],
) -> list[dict[str, Any]]:
    """mmcv's grouping of the trainable parameters of ``model``: weight decay 0 where the name contains an entry of
    ``no_decay_keys``, ``weight_decay`` on every other parameter; lr ``lr * backbone_lr_mult`` inside the timm model
    ``backbone``, ``lr`` elsewhere."""
    inner = {id(p) for p in backbone.parameters()}
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = 0.0 if any(key in name for key in no_decay_keys) else weight_decay
        group_lr = lr * backbone_lr_mult if id(p) in inner else lr
        groups.setdefault((group_lr, decay), []).append(p)
    return [{"params": params, "lr": g_lr, "weight_decay": wd} for (g_lr, wd), params in groups.items()]
