"""Cascade Mask R-CNN (Cai & Vasconcelos, 2018/2019) from torchvision's detection parts, as the mmdetection configs of
the NAT, DiNAT and Agent-Swin papers build it.

Three box stages, each trained on the boxes the previous stage regressed, with rising IoU thresholds (0.5, 0.6, 0.7),
tighter box-delta scales (stds 0.1/0.2, 0.05/0.1, 0.033/0.067) and loss weights 1, 0.5, 0.25. Every stage has a
4-conv (BatchNorm) + 1-fc box head with class-specific regression trained by a GIoU loss (weight 10) on the decoded
boxes, and its own mask head (4 convs + deconvolution, trained on that stage's positive boxes). At test time the
class scores are the softmax of the three stages' averaged logits, the boxes those the last stage regresses from the
boxes of the second, and the mask of a detection the average of the three mask heads' probabilities.

Inputs and outputs follow torchvision: ``model(images)`` with images ``[(3, H, W), ...]`` in [0, 1] -> one dict per
image (``boxes`` ``(N, 4)`` xyxy in input pixels, ``labels`` ``(N,)`` in ``1..K``, ``scores``, ``masks``
``(N, 1, H, W)``); in training ``model(images, targets)`` -> a dict of losses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import maskrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, generalized_box_iou_loss
from torchvision.ops import boxes as box_ops

__all__ = ["CascadeMaskRCNN", "CascadeRoIHeads"]

STAGE_IOU_THRESHOLDS = (0.5, 0.6, 0.7)
STAGE_BOX_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))
STAGE_LOSS_WEIGHTS = (1.0, 0.5, 0.25)


class CascadeRoIHeads(nn.Module):
    """The cascade of box stages (and their mask heads) on RPN proposals.

    ``forward(features, proposals, image_shapes, targets=None)`` -> ``(detections, losses)`` like torchvision's
    ``RoIHeads``: ``features`` the pyramid dict, ``proposals`` one ``(P_i, 4)`` box tensor per image (in the
    resized image's pixels), ``targets`` dicts with ``boxes``, ``labels`` (``1..K``) and ``masks`` ``(N, H, W)``.
    """

    def __init__(
        self,
        box_roi_pool: MultiScaleRoIAlign,
        box_heads: Sequence[nn.Module],
        box_predictors: Sequence[nn.Module],
        mask_roi_pool: MultiScaleRoIAlign | None = None,
        mask_heads: Sequence[nn.Module] | None = None,
        mask_predictors: Sequence[nn.Module] | None = None,
        iou_thresholds: Sequence[float] = STAGE_IOU_THRESHOLDS,
        box_stds: Sequence[Sequence[float]] = STAGE_BOX_STDS,
        loss_weights: Sequence[float] = STAGE_LOSS_WEIGHTS,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        giou_loss_weight: float = 10.0,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
    ) -> None:
        super().__init__()
        stages = len(box_heads)
        lengths = {
            "box_predictors": len(box_predictors),
            "iou_thresholds": len(iou_thresholds),
            "box_stds": len(box_stds),
            "loss_weights": len(loss_weights),
        }
        if mask_roi_pool is not None:
            lengths.update(mask_heads=len(mask_heads or ()), mask_predictors=len(mask_predictors or ()))
        wrong = {name: n for name, n in lengths.items() if n != stages}
        if stages < 1 or wrong:
            raise ValueError(f"every stage setting needs one entry per box head ({stages} stages); got {wrong}")
        if any(len(std) != 4 or min(std) <= 0 for std in box_stds):
            raise ValueError(f"box_stds must hold 4 positive numbers per stage, got {[list(s) for s in box_stds]}")
        self.box_roi_pool = box_roi_pool
        self.box_heads = nn.ModuleList(box_heads)
        self.box_predictors = nn.ModuleList(box_predictors)
        self.mask_roi_pool = mask_roi_pool
        self.mask_heads = nn.ModuleList(mask_heads) if mask_roi_pool is not None else None
        self.mask_predictors = nn.ModuleList(mask_predictors) if mask_roi_pool is not None else None
        self.matchers = [det_utils.Matcher(t, t, allow_low_quality_matches=False) for t in iou_thresholds]
        self.box_coders = [det_utils.BoxCoder(tuple(1.0 / s for s in std)) for std in box_stds]
        self.fg_bg_sampler = det_utils.BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.loss_weights = [float(w) for w in loss_weights]
        self.giou_loss_weight = giou_loss_weight
        self.score_thresh, self.nms_thresh, self.detections_per_img = score_thresh, nms_thresh, detections_per_img

    @property
    def num_stages(self) -> int:
        return len(self.box_heads)

    def has_mask(self) -> bool:
        return self.mask_roi_pool is not None

    # ------------------------------------------------------------------ training
    def _sample(
        self, stage: int, proposals: list[Tensor], gt_boxes: list[Tensor], gt_labels: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """The ground-truth boxes join each image's proposals, every box is matched at the stage's IoU threshold and
        ``batch_size_per_image`` are drawn (``positive_fraction`` positives at most). Returns per image the drawn
        boxes, their labels (0 = background), matched ground-truth indices and whether each is a ground-truth box."""
        matcher = self.matchers[stage]
        labels, matched = [], []
        all_boxes = [torch.cat([p, g]) for p, g in zip(proposals, gt_boxes)]
        for boxes, gt, gt_label in zip(all_boxes, gt_boxes, gt_labels):
            if gt.numel() == 0:
                matched.append(torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device))
                labels.append(torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device))
                continue
            index = matcher(box_ops.box_iou(gt, boxes))
            label = gt_label[index.clamp(min=0)].to(torch.int64)
            label[index == matcher.BELOW_LOW_THRESHOLD] = 0
            label[index == matcher.BETWEEN_THRESHOLDS] = -1
            matched.append(index.clamp(min=0))
            labels.append(label)
        positive, negative = self.fg_bg_sampler(labels)
        out_boxes, out_labels, out_matched, out_is_gt = [], [], [], []
        for boxes, label, index, pos, neg, p in zip(all_boxes, labels, matched, positive, negative, proposals):
            keep = torch.where(pos | neg)[0]
            out_boxes.append(boxes[keep])
            out_labels.append(label[keep])
            out_matched.append(index[keep])
            out_is_gt.append(keep >= len(p))
        return out_boxes, out_labels, out_matched, out_is_gt

    def _stage_losses(
        self,
        stage: int,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> tuple[dict[str, Tensor], list[Tensor]]:
        """Losses of one stage and, for the next, its regressed boxes (the sampled ground truths left out)."""
        gt_boxes = [t["boxes"].to(proposals[0].dtype) for t in targets]
        gt_labels = [t["labels"] for t in targets]
        rois, labels, matched, is_gt = self._sample(stage, proposals, gt_boxes, gt_labels)
        logits, deltas = self.box_predictors[stage](
            self.box_heads[stage](self.box_roi_pool(features, rois, image_shapes))
        )
        all_labels, all_rois = torch.cat(labels), torch.cat(rois)
        weight = self.loss_weights[stage]
        losses = {f"loss_classifier_s{stage}": weight * F.cross_entropy(logits, all_labels)}
        deltas = deltas.reshape(len(all_rois), -1, 4)
        pos = torch.where(all_labels > 0)[0]
        coder = self.box_coders[stage]
        predicted = coder.decode_single(deltas[pos, all_labels[pos]], all_rois[pos])
        matched_boxes = torch.cat([g[m] if len(g) else g.new_zeros((len(m), 4)) for g, m in zip(gt_boxes, matched)])[
            pos
        ]
        giou = generalized_box_iou_loss(predicted, matched_boxes, reduction="sum") / max(len(all_labels), 1)
        losses[f"loss_box_giou_s{stage}"] = weight * self.giou_loss_weight * giou
        if self.has_mask():
            positive = [r[lab > 0] for r, lab in zip(rois, labels)]
            positive_matched = [m[lab > 0] for m, lab in zip(matched, labels)]
            mask_logits = self.mask_predictors[stage](
                self.mask_heads[stage](self.mask_roi_pool(features, positive, image_shapes))
            )
            gt_masks = [t["masks"] for t in targets]
            losses[f"loss_mask_s{stage}"] = weight * maskrcnn_loss(
                mask_logits, positive, gt_masks, gt_labels, positive_matched
            )
        refined: list[Tensor] = []
        if stage + 1 < self.num_stages:
            with torch.no_grad():
                guess = logits[:, 1:].argmax(dim=1) + 1
                refine_labels = torch.where(all_labels > 0, all_labels, guess)
                index = torch.arange(len(all_rois), device=deltas.device)
                boxes = coder.decode_single(deltas[index, refine_labels], all_rois)
                for b, gt_flag, shape in zip(boxes.split([len(r) for r in rois]), is_gt, image_shapes):
                    refined.append(box_ops.clip_boxes_to_image(b[~gt_flag], shape).detach())
        return losses, refined

    # ------------------------------------------------------------------ inference
    def _detect(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        rois = proposals
        logits_sum: Tensor | None = None
        for stage in range(self.num_stages):
            feats = self.box_heads[stage](self.box_roi_pool(features, rois, image_shapes))
            logits, deltas = self.box_predictors[stage](feats)
            logits_sum = logits if logits_sum is None else logits_sum + logits
            if stage + 1 < self.num_stages:
                labels = logits[:, 1:].argmax(dim=1) + 1
                index = torch.arange(len(logits), device=logits.device)
                deltas = deltas.reshape(len(logits), -1, 4)[index, labels]
                boxes = self.box_coders[stage].decode_single(deltas, torch.cat(rois))
                rois = [
                    box_ops.clip_boxes_to_image(b, shape)
                    for b, shape in zip(boxes.split([len(r) for r in rois]), image_shapes)
                ]
        scores = F.softmax(logits_sum / self.num_stages, dim=-1)
        boxes = self.box_coders[-1].decode(deltas, rois)  # (sum P_i, K + 1, 4)
        results = []
        for image_boxes, image_scores, shape in zip(
            boxes.split([len(r) for r in rois]), scores.split([len(r) for r in rois]), image_shapes
        ):
            results.append(self._select(image_boxes, image_scores, shape))
        if self.has_mask():
            self._add_masks(features, results, image_shapes)
        return results

    def _select(self, boxes: Tensor, scores: Tensor, shape: tuple[int, int]) -> dict[str, Tensor]:
        """Per-class boxes ``(P, K + 1, 4)`` and scores ``(P, K + 1)`` -> thresholded, class-wise NMS detections."""
        boxes = box_ops.clip_boxes_to_image(boxes, shape)[:, 1:].reshape(-1, 4)
        labels = torch.arange(1, scores.shape[1], device=scores.device).expand(len(scores), -1).reshape(-1)
        scores = scores[:, 1:].reshape(-1)
        keep = torch.where(scores > self.score_thresh)[0]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
        return {"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep]}

    def _add_masks(
        self, features: dict[str, Tensor], results: list[dict[str, Tensor]], image_shapes: list[tuple[int, int]]
    ) -> None:
        """``masks`` ``(N, 1, M, M)``: the mean over the stages' mask heads of the detected class's probability."""
        boxes = [r["boxes"] for r in results]
        labels = torch.cat([r["labels"] for r in results])
        pooled = self.mask_roi_pool(features, boxes, image_shapes)
        index = torch.arange(len(labels), device=labels.device)
        probs = sum(
            predictor(head(pooled)).sigmoid()[index, labels]
            for head, predictor in zip(self.mask_heads, self.mask_predictors)
        )
        probs = probs / self.num_stages
        for result, masks in zip(results, probs[:, None].split([len(b) for b in boxes])):
            result["masks"] = masks

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if not self.training:
            return self._detect(features, proposals, image_shapes), {}
        if targets is None:
            raise ValueError("CascadeRoIHeads in training mode needs targets")
        for t in targets:
            if not t["boxes"].is_floating_point() or t["labels"].dtype != torch.int64:
                raise TypeError(
                    f"targets need float boxes and int64 labels, got {t['boxes'].dtype} and {t['labels'].dtype}"
                )
            if self.has_mask() and "masks" not in t:
                raise ValueError("Cascade Mask R-CNN targets need masks (N, H, W)")
        losses: dict[str, Tensor] = {}
        for stage in range(self.num_stages):
            stage_losses, proposals = self._stage_losses(stage, features, proposals, image_shapes, targets)
            losses.update(stage_losses)
        return [], losses


class CascadeMaskRCNN(GeneralizedRCNN):
    """Cascade Mask R-CNN on a backbone with ``out_channels`` (a feature pyramid dict).

    ``num_classes`` includes the background (labels ``1..num_classes - 1``). The transform and RPN arguments are
    torchvision's ``FasterRCNN`` ones (same names and defaults); ``box_*`` are the R-CNN settings shared by the stages;
    ``stage_iou_thresholds`` / ``stage_box_stds`` / ``stage_loss_weights`` one entry per stage; ``giou_loss_weight``
    scales the box loss. The box heads are 4 convs as wide as the pyramid
    (BatchNorm, ReLU) + one ``box_fc_channels``-wide fc, the mask heads torchvision's (4 convs as wide as the pyramid,
    a 2x deconvolution, per-class logits), as mmdet's ``Shared4Conv1FCBBoxHead`` and ``FCNMaskHead``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        min_size: int = 800,
        max_size: int = 1333,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        rpn_anchor_generator: AnchorGenerator | None = None,
        rpn_pre_nms_top_n_train: int = 2000,
        rpn_pre_nms_top_n_test: int = 1000,
        rpn_post_nms_top_n_train: int = 2000,
        rpn_post_nms_top_n_test: int = 1000,
        rpn_nms_thresh: float = 0.7,
        rpn_fg_iou_thresh: float = 0.7,
        rpn_bg_iou_thresh: float = 0.3,
        rpn_batch_size_per_image: int = 256,
        rpn_positive_fraction: float = 0.5,
        rpn_score_thresh: float = 0.0,
        box_roi_pool: MultiScaleRoIAlign | None = None,
        mask_roi_pool: MultiScaleRoIAlign | None = None,
        box_score_thresh: float = 0.05,
        box_nms_thresh: float = 0.5,
        box_detections_per_img: int = 100,
        box_batch_size_per_image: int = 512,
        box_positive_fraction: float = 0.25,
        stage_iou_thresholds: Sequence[float] = STAGE_IOU_THRESHOLDS,
        stage_box_stds: Sequence[Sequence[float]] = STAGE_BOX_STDS,
        stage_loss_weights: Sequence[float] = STAGE_LOSS_WEIGHTS,
        giou_loss_weight: float = 10.0,
        box_fc_channels: int = 1024,
        **kwargs: Any,
    ) -> None:
        channels = backbone.out_channels
        if rpn_anchor_generator is None:
            rpn_anchor_generator = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
        rpn = RegionProposalNetwork(
            rpn_anchor_generator,
            RPNHead(channels, rpn_anchor_generator.num_anchors_per_location()[0]),
            rpn_fg_iou_thresh,
            rpn_bg_iou_thresh,
            rpn_batch_size_per_image,
            rpn_positive_fraction,
            dict(training=rpn_pre_nms_top_n_train, testing=rpn_pre_nms_top_n_test),
            dict(training=rpn_post_nms_top_n_train, testing=rpn_post_nms_top_n_test),
            rpn_nms_thresh,
            score_thresh=rpn_score_thresh,
        )
        names = ["0", "1", "2", "3"]
        box_roi_pool = box_roi_pool or MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2)
        resolution = box_roi_pool.output_size[0]
        stages = range(len(stage_iou_thresholds))
        box_heads = [
            FastRCNNConvFCHead(
                (channels, resolution, resolution), [channels] * 4, [box_fc_channels], norm_layer=nn.BatchNorm2d
            )
            for _ in stages
        ]
        box_predictors = [FastRCNNPredictor(box_fc_channels, num_classes) for _ in stages]
        mask_roi_pool = mask_roi_pool or MultiScaleRoIAlign(names, output_size=14, sampling_ratio=2)
        mask_heads = [MaskRCNNHeads(channels, [channels] * 4, 1) for _ in stages]
        mask_predictors = [MaskRCNNPredictor(channels, channels, num_classes) for _ in stages]
        roi_heads = CascadeRoIHeads(
            box_roi_pool,
            box_heads,
            box_predictors,
            mask_roi_pool,
            mask_heads,
            mask_predictors,
            iou_thresholds=stage_iou_thresholds,
            box_stds=stage_box_stds,
            loss_weights=stage_loss_weights,
            batch_size_per_image=box_batch_size_per_image,
            positive_fraction=box_positive_fraction,
            giou_loss_weight=giou_loss_weight,
            score_thresh=box_score_thresh,
            nms_thresh=box_nms_thresh,
            detections_per_img=box_detections_per_img,
        )
        image_mean = image_mean if image_mean is not None else [0.485, 0.456, 0.406]
        image_std = image_std if image_std is not None else [0.229, 0.224, 0.225]
        transform = GeneralizedRCNNTransform(min_size, max_size, image_mean, image_std, **kwargs)
        super().__init__(backbone, rpn, roi_heads, transform)
