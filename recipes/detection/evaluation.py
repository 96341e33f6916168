"""COCO results JSON and pycocotools ``COCOeval`` (bbox, segm) for torchvision detector outputs."""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["METRIC_NAMES", "detections_to_coco", "evaluate_coco"]

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def detections_to_coco(
    output: dict[str, torch.Tensor], image_id: int, category_ids: Sequence[int], mask_threshold: float = 0.5
) -> list[dict[str, Any]]:
    """One image's detector output (``boxes`` ``(N, 4)`` xyxy, ``labels`` ``(N,)`` in ``1..K``, ``scores``, optional
    ``masks`` ``(N, 1, H, W)`` probabilities) -> COCO result dicts (``bbox`` xywh, ``category_id`` =
    ``category_ids[label - 1]``, ``score``, ``segmentation`` as RLE with a str ``counts``)."""
    boxes = output["boxes"].detach().float().cpu()
    boxes = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    labels, scores = output["labels"].tolist(), output["scores"].detach().float().cpu().tolist()
    rles = None
    if "masks" in output:
        masks = (output["masks"][:, 0] > mask_threshold).cpu().numpy().astype(np.uint8)
        rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0))) if len(masks) else []
    results = []
    for k, (box, label, score) in enumerate(zip(boxes, labels, scores)):
        item = {
            "image_id": int(image_id),
            "category_id": int(category_ids[label - 1]),
            "bbox": [round(v, 2) for v in box],
            "score": round(float(score), 5),
        }
        if rles is not None:
            item["segmentation"] = {"size": rles[k]["size"], "counts": rles[k]["counts"].decode("ascii")}
        results.append(item)
    return results


def evaluate_coco(
    coco_gt: COCO, results: list[dict[str, Any]], iou_types: Sequence[str] = ("bbox",), image_ids=None
) -> tuple[dict[str, float], str]:
    """COCOeval of ``results`` against ``coco_gt`` for each of ``iou_types`` (``"bbox"``, ``"segm"``) on
    ``image_ids`` (default: all ground-truth images). Returns ``({"bbox_AP": ..., "bbox_AP50": ..., ...}, the
    printed summaries)``; with no detections every metric is 0."""
    metrics: dict[str, float] = {}
    text = []
    for iou_type in iou_types:
        if iou_type not in ("bbox", "segm"):
            raise ValueError(f"iou_types must hold 'bbox' or 'segm', got {iou_type!r}")
        dets = copy.deepcopy(results)
        if iou_type == "segm":
            dets = [{k: v for k, v in d.items() if k != "bbox"} for d in dets if "segmentation" in d]
        if not dets:
            metrics.update({f"{iou_type}_{name}": 0.0 for name in METRIC_NAMES})
            text.append(f"{iou_type}: no detections")
            continue
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            coco_dt = coco_gt.loadRes(dets)
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
            if image_ids is not None:
                evaluator.params.imgIds = sorted(set(int(i) for i in image_ids))
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        summary = [line for line in buffer.getvalue().splitlines() if line.lstrip().startswith("Average")]
        text.append(f"{iou_type}:\n" + "\n".join(summary))
        metrics.update({f"{iou_type}_{name}": float(v) for name, v in zip(METRIC_NAMES, evaluator.stats[:6])})
    return metrics, "\n".join(text)
