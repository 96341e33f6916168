"""Dataset-level semantic segmentation metrics, as the papers computed them (mmseg's ``mIoU`` evaluation).

One confusion matrix over the whole evaluation set (summed across ranks), then per class ``c``:
``IoU_c = TP_c / (GT_c + Pred_c - TP_c)`` and ``Acc_c = TP_c / GT_c``; ``mIoU`` / ``mAcc`` average over the classes
where they are defined (a class absent from both prediction and ground truth has no IoU; a class absent from the
ground truth has no accuracy), ``aAcc = sum_c TP_c / sum_c GT_c``. Pixels labelled ``ignore_index`` count nowhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["confusion_matrix", "segmentation_metrics"]


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """``(num_classes, num_classes)`` int64 counts, row = ground-truth class, column = predicted class, of the pixels
    of ``pred`` and ``target`` (same shape, integer class indices) whose target is not ``ignore_index``."""
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    keep = target != ignore_index
    pred, target = pred[keep].long(), target[keep].long()
    if len(target) and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(f"target holds classes outside [0, {num_classes}) that are not ignore_index {ignore_index}")
    if len(pred) and (int(pred.min()) < 0 or int(pred.max()) >= num_classes):
        raise ValueError(f"pred holds classes outside [0, {num_classes})")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes)


def _nanmean(values: torch.Tensor) -> float:
    defined = values[~values.isnan()]
    return float(defined.mean()) if len(defined) else math.nan


def segmentation_metrics(confusion: torch.Tensor, class_names: Sequence[str] | None = None) -> dict:
    """``{"mIoU", "mAcc", "aAcc"}`` (fractions in [0, 1]; NaN when undefined) and ``"per_class"``: one
    ``{"class", "IoU", "Acc", "gt_pixels", "pred_pixels"}`` row per class (``IoU`` / ``Acc`` ``None`` where undefined),
    from a confusion matrix ``(K, K)`` (rows ground truth, columns prediction)."""
    confusion = confusion.double().cpu()
    tp = confusion.diagonal()
    gt, pred = confusion.sum(1), confusion.sum(0)
    union = gt + pred - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, math.nan))
    names = list(class_names) if class_names is not None else [str(c) for c in range(len(tp))]
    if len(names) != len(tp):
        raise ValueError(f"class_names has {len(names)} names for {len(tp)} classes")
    rows = [
        {
            "class": name,
            "IoU": None if math.isnan(i) else i,
            "Acc": None if math.isnan(a) else a,
            "gt_pixels": int(g),
            "pred_pixels": int(p),
        }
        for name, i, a, g, p in zip(names, iou.tolist(), acc.tolist(), gt.tolist(), pred.tolist())
    ]
    total = float(gt.sum())
    return {
        "mIoU": _nanmean(iou),
        "mAcc": _nanmean(acc),
        "aAcc": float(tp.sum()) / total if total else math.nan,
        "per_class": rows,
    }
