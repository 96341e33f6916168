"""Lightning training recipes: image classification (module, data module, callbacks, samplers, configs, the
LightningCLI entry point ``attnzoo fit|validate|test|predict``; frozen-backbone probing, :mod:`.probe`), COCO
detection (:mod:`.detection`: ``build_detector``, ``ObjectDetector``, ``CocoDataModule``, ``attnzoo detect``) and
ADE20K semantic segmentation (:mod:`.segmentation`: ``build_segmenter``, ``SemanticSegmenter``,
``SegmentationDataModule``, ``attnzoo segment``).

The public classes are importable from here (``from attnzoo.recipes import ImageClassifier, ImageDataModule``); they
are loaded on first use, so ``import attnzoo.recipes`` alone does not import Lightning.
"""

from __future__ import annotations

from .lazy_exports import lazy_exports

# public name -> submodule that defines it
_EXPORTS = {
    "ImageClassifier": "module",
    "ImageDataModule": "data",
    "AspectBinDataset": "data",
    "ProbedModel": "probe",
    "load_probed_model": "probe",
    "ExportWeights": "callbacks",
    "LoggedLearningRate": "callbacks",
    "PredictionWriter": "callbacks",
    "RemoveStaleTempFiles": "callbacks",
    "ThroughputProgressBar": "callbacks",
    "TrainingSummary": "callbacks",
    "AtomicCheckpointIO": "checkpoint_io",
    "AspectRatioBatchSampler": "samplers",
    "PaddedEvalDataset": "samplers",
    "RepeatedAugSampler": "samplers",
    "SeededDataset": "samplers",
    "ShardedEvalSampler": "samplers",
    "EmbeddedDigits": "embedded",
    "build_dataset": "datasets",
    "export_for_timm": "export",
    "run_cli": "cli",
    "build_detector": "detection.build",
    "ObjectDetector": "detection.module",
    "CocoDataModule": "detection.data",
    "build_segmenter": "segmentation.build",
    "SemanticSegmenter": "segmentation.module",
    "SegmentationDataModule": "segmentation.data",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
