"""Semantic segmentation (ADE20K): UperNet and Semantic FPN on zoo backbones, data, Lightning module, CLI.

Public names are imported on first use (``attnzoo.recipes.segmentation.build_segmenter``...), so importing the
package does not pull in Lightning.
"""

from __future__ import annotations

from ..lazy_exports import lazy_exports

_EXPORTS = {
    "DECODERS": "build",
    "Segmenter": "build",
    "build_segmenter": "build",
    "UPerHead": "heads",
    "FCNHead": "heads",
    "FPNHead": "heads",
    "SemanticSegmenter": "module",
    "SegmentationDataModule": "data",
    "SegmentationFolder": "data",
    "SegmentationTrainTransform": "transforms",
    "confusion_matrix": "metrics",
    "segmentation_metrics": "metrics",
    "segment_image": "inference",
    "slide_logits": "inference",
    "SegmentationWriter": "writer",
    "render_segmentation": "writer",
    "ADE20K_CLASSES": "classes",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
