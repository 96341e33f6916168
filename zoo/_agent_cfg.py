"""Pretrained cfg shared by the Agent-Attention families (Agent-DeiT, Agent-PVT, Agent-Swin)."""

from __future__ import annotations

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
