"""AdamW parameter groups of the dense-prediction recipes (detection, segmentation): a timm backbone inside a
larger model (pyramid, heads)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn

__all__ = ["dense_param_groups"]


def dense_param_groups(
    model: nn.Module,
    backbone: nn.Module,
    lr: float,
    weight_decay: float,
    backbone_lr_mult: float = 1.0,
    layer_decay: float | None = None,
    no_decay_keys: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Groups of the trainable parameters of ``model``: the timm model ``backbone``'s (timm's weight-decay grouping,
    or its layer-wise lr decay through ``group_matcher`` when ``layer_decay`` is set; lr ``lr * backbone_lr_mult *
    lr_scale``) and the rest (lr ``lr``). No weight decay on 1-D parameters (norms, biases), on the backbone's
    ``no_weight_decay()`` names (position tables, relative-position biases) and on parameters whose name contains
    one of ``no_decay_keys`` (mmcv's ``paramwise_cfg`` ``custom_keys`` with ``decay_mult=0``)."""
    skip = set(backbone.no_weight_decay()) if hasattr(backbone, "no_weight_decay") else set()
    skip |= {n for n, _ in backbone.named_parameters() if any(k in n for k in no_decay_keys)}
    # keywords: timm 1.0.31 put ``weight_decay_exclude_1d`` third in ``param_groups_weight_decay``
    if layer_decay is not None:
        groups = param_groups_layer_decay(
            backbone, weight_decay=weight_decay, no_weight_decay_list=sorted(skip), layer_decay=layer_decay
        )
    else:
        groups = param_groups_weight_decay(backbone, weight_decay=weight_decay, no_weight_decay_list=sorted(skip))
    for group in groups:
        group["lr"] = lr * backbone_lr_mult * group.get("lr_scale", 1.0)
    inner = {id(p) for p in backbone.parameters()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if id(p) in inner or not p.requires_grad:
            continue
        flat = p.ndim <= 1 or name.endswith(".bias") or any(k in name for k in no_decay_keys)
        (no_decay if flat else decay).append(p)
    head = [
        {"params": decay, "weight_decay": weight_decay, "lr": lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr},
    ]
    return [g for g in groups + head if g["params"]]
