"""COCO detection and instance segmentation: torchvision detectors on zoo backbones, data, Lightning module, CLI.

Public names are imported on first use (``attnzoo.recipes.detection.build_detector``...), so importing the package
does not pull in Lightning or pycocotools.
"""

from __future__ import annotations

from ..lazy_exports import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
