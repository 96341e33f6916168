"""Cascade Mask R-CNN: trains on a tiny backbone, detects at odd sizes, and combines its stages as mmdetection does
(class scores from the mean of the three stages' logits, boxes from the last stage, masks averaged)."""

from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import MultiScaleRoIAlign

from attnzoo.recipes.detection import build_detector
from attnzoo.recipes.detection.cascade import STAGE_BOX_STDS, CascadeRoIHeads

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


PVT = dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64), num_heads=(1, 1, 2, 2))
SMALL = dict(
    box_fc_channels=32,
    box_batch_size_per_image=32,
    rpn_batch_size_per_image=32,
    rpn_pre_nms_top_n_train=100,
    rpn_post_nms_top_n_train=50,
    rpn_pre_nms_top_n_test=100,
    rpn_post_nms_top_n_test=50,
)


def batch():
    """Two odd-sized images (71x97, 97x71) with rectangles as boxes and masks."""
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 71, 97, generator=generator), torch.rand(3, 97, 71, generator=generator)]
    targets = []
    for image, boxes, labels in [
        (images[0], [[8, 12, 44, 52], [40, 20, 90, 66]], [1, 2]),
        (images[1], [[14, 22, 60, 84]], [3]),
    ]:
        boxes = torch.tensor(boxes, dtype=torch.float32)
        masks = torch.zeros(len(boxes), *image.shape[1:], dtype=torch.uint8)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
            mask[y0:y1, x0:x1] = 1
            image[:, y0:y1, x0:x1] = 0.9  # visible objects
        targets.append(dict(boxes=boxes, labels=torch.tensor(labels), masks=masks))
    return images, targets


def test_cascade_trains_and_detects_at_odd_sizes():
    """(The mmdet arithmetic's inference runs in tests/test_detection_mmdet_convert.py.)"""
    torch.manual_seed(0)
    model = build_detector(
        "cascade_mask_rcnn", "agent_pvt_tiny", 3, fpn_channels=16, min_size=64, max_size=96, detector_kwargs=SMALL,
        **PVT,
    )  # fmt: skip
    images, targets = batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    totals = []
    for step in range(4):
        losses = model(images, targets)
        assert set(losses) == {
            *(f"loss_{name}_s{s}" for name in ("classifier", "box_giou", "mask") for s in range(3)),
            "loss_objectness",
            "loss_rpn_box_reg",
        }
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
            assert not missing, missing[:5]
        optimizer.step()
        totals.append(loss.item())
    assert totals[-1] < totals[0], totals
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    for image, out in zip(images, outputs):
        n = len(out["boxes"])
        height, width = image.shape[1:]
        assert out["scores"].shape == out["labels"].shape == (n,) and out["masks"].shape == (n, 1, height, width)
        assert bool((out["boxes"][:, 0::2] <= width).all() and (out["boxes"][:, 1::2] <= height).all())
        assert bool(((out["labels"] >= 1) & (out["labels"] <= 3)).all())
        assert bool(((out["masks"] >= 0) & (out["masks"] <= 1)).all())
    assert sum(len(o["boxes"]) for o in outputs) > 0


class ConstantPredictor(nn.Module):
    """A stage whose class logits and box deltas are the same for every box (a bias)."""

    def __init__(self, logits, deltas):
        super().__init__()
        self.logits, self.deltas = torch.tensor(logits), torch.tensor(deltas)

    def forward(self, x):
        return self.logits.expand(len(x), -1), self.deltas.expand(len(x), -1)


class ConstantMask(nn.Module):
    def __init__(self, logit, classes):
        super().__init__()
        self.logit, self.classes = logit, classes

    def forward(self, x):
        return torch.full((len(x), self.classes, 4, 4), self.logit)


def test_test_time_combines_stages_as_mmdet():
    """Stage 1 prefers class 1 and moves boxes right, stage 2 prefers class 2 and moves them down, stage 3 prefers
    class 1 slightly; the mean of the logits prefers class 2. Detections: class 2's softmax of the mean logits,
    the box stage 3 regresses (class 2's deltas) from the box stages 1 and 2 moved (their own top classes)."""
    logits = [[0.0, 3.0, 0.0, 0.0], [0.0, 0.0, 4.0, 0.0], [0.0, 1.0, 0.5, 0.0]]
    deltas = [[0.0] * 16 for _ in range(3)]
    deltas[0][4 * 1 + 0] = 0.5  # stage 1, class 1: dx
    deltas[1][4 * 2 + 1] = 0.5  # stage 2, class 2: dy
    deltas[2][4 * 2 + 2] = 0.3  # stage 3, class 2: dw
    deltas[2][4 * 1 + 0] = 9.0  # stage 3, class 1 (not the detection's class): unused
    mask_logits = [0.0, 1.0, -2.0]
    heads = CascadeRoIHeads(
        MultiScaleRoIAlign(["0"], output_size=2, sampling_ratio=1),
        [nn.Flatten() for _ in range(3)],
        [ConstantPredictor(lg, d) for lg, d in zip(logits, deltas)],
        MultiScaleRoIAlign(["0"], output_size=2, sampling_ratio=1),
        [nn.Identity() for _ in range(3)],
        [ConstantMask(m, 4) for m in mask_logits],
        score_thresh=0.05,
        detections_per_img=1,
    ).eval()
    features = OrderedDict([("0", torch.rand(1, 2, 50, 50))])
    proposal = torch.tensor([[40.0, 40.0, 80.0, 60.0]])
    (result,), _ = heads(features, [proposal], [(200, 200)])
    expected_score = torch.softmax(torch.tensor(logits).mean(0), 0)[2]
    box = BoxCoder(tuple(1 / s for s in STAGE_BOX_STDS[0])).decode_single(torch.tensor([deltas[0][4:8]]), proposal)
    box = BoxCoder(tuple(1 / s for s in STAGE_BOX_STDS[1])).decode_single(torch.tensor([deltas[1][8:12]]), box)
    box = BoxCoder(tuple(1 / s for s in STAGE_BOX_STDS[2])).decode_single(torch.tensor([deltas[2][8:12]]), box)
    assert result["labels"].tolist() == [2]
    torch.testing.assert_close(result["scores"], expected_score[None])
    torch.testing.assert_close(result["boxes"], box)
    torch.testing.assert_close(result["masks"], torch.sigmoid(torch.tensor(mask_logits)).mean().expand(1, 1, 4, 4))


def test_stage_settings_must_agree():
    pool = MultiScaleRoIAlign(["0"], output_size=2, sampling_ratio=1)
    with pytest.raises(ValueError, match="one entry per box head"):
        CascadeRoIHeads(pool, [nn.Flatten()] * 3, [nn.Flatten()] * 3, iou_thresholds=(0.5, 0.6))
    with pytest.raises(TypeError, match="detector_kwargs"):
        build_detector("cascade_mask_rcnn", "agent_pvt_tiny", 3, detector_kwargs=dict(box_fg_iou_thresh=0.5), **PVT)
