"""COCO detection and instance segmentation: torchvision detectors on zoo backbones, data, Lightning module, CLI.

Public names are imported on first use (``attnzoo.recipes.detection.build_detector``...), so importing the package
does not pull in Lightning or pycocotools.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ARCHS": "build",
    "build_detector": "build",
    "build_backbone": "backbones",
    "FeatureBackbone": "backbones",
    "SimpleFeaturePyramid": "backbones",
    "ViTDetBackbone": "backbones",
    "CocoDataModule": "data",
    "ObjectDetector": "module",
    "evaluate_coco": "evaluation",
    "detections_to_coco": "evaluation",
    "load_coco_json": "coco_json",
    "DetectionWriter": "writer",
    "render_detections": "writer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
