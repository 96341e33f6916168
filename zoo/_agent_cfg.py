"""Pretrained cfg shared by the Agent-Attention families (Agent-DeiT, Agent-PVT, Agent-Swin)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


def agent_cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    """timm pretrained cfg of an official Agent-Attention ImageNet-1k checkpoint (hierarchical-model defaults).

    Evaluation as in the official code (Swin code base): the image is resized to a square ``input / crop_pct`` and
    center-cropped (``TEST.CROP`` true, crop_pct 0.875), or resized straight to the input size (``TEST.CROP: False``
    in the 288 / 384 Swin configs, crop_pct 1.0): timm's ``crop_mode="squash"``.
    """
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "crop_mode": "squash",
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.proj",
        "classifier": "head.fc",
        "license": "other",
        "notes": ("The official Agent-Attention repository publishes no licence; terms of the weights are unknown.",),
        "paper_ids": ["arXiv:2312.08874"],
        "paper_name": "Agent Attention: On the Integration of Softmax and Linear Attention",
        "origin_url": "https://github.com/LeapLabTHU/Agent-Attention",
        **kwargs,
    }


def check_agent_shapes(shapes: Sequence[int | Sequence[int] | None] | None, num_stages: int) -> list[Any]:
    """``downstream_agent_shapes`` of a pyramid model: ``None`` or one entry per stage (``None``, an int ``s`` for
    ``s x s`` or an ``(ah, aw)`` pair of positive ints), as a list of ``None`` / pairs."""
    if shapes is None:
        return [None] * num_stages
    if isinstance(shapes, (str, bytes)) or not isinstance(shapes, Sequence) or len(shapes) != num_stages:
        raise ValueError(
            f"downstream_agent_shapes must give one (ah, aw) grid per stage ({num_stages}), got {shapes!r}"
        )
    out: list[Any] = []
    for shape in shapes:
        pair = (shape, shape) if isinstance(shape, int) else tuple(shape) if shape is not None else None
        if pair is not None and (len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair)):
            raise ValueError(f"downstream_agent_shapes entries must be (ah, aw) pairs of positive ints, got {shapes!r}")
        out.append(pair)
    return out
