"""Segmentation models and their evaluation maths: UperNet / Semantic FPN on hierarchical and plain backbones at odd
sizes, the dataset-level metric on hand-made confusion cases, sliding-window and flip inference, the schedules."""

import math

import pytest
import torch

from attnzoo.recipes.segmentation import (
    build_segmenter,
    confusion_matrix,
    segment_image,
    segmentation_metrics,
    slide_logits,
)
from attnzoo.recipes.segmentation.inference import rescale_size
from attnzoo.recipes.segmentation.schedule import IterationSchedule

TINY = {
    "nat_mini": dict(depths=[1, 1, 1, 1], embed_dim=16, num_heads=[1, 1, 2, 2]),
    "gated_vit_tiny_patch16_224": dict(depth=1, embed_dim=32, num_heads=2),
}


@pytest.mark.parametrize("decoder", ["upernet", "fpn"])
@pytest.mark.parametrize("backbone", sorted(TINY))
def test_decoders_train_at_odd_sizes(decoder, backbone):
    torch.manual_seed(0)
    model = build_segmenter(decoder, backbone, 5, channels=16, fpn_channels=16, aux_channels=8, **TINY[backbone])
    assert (model.auxiliary_head is not None) == (decoder == "upernet")
    patch = 16 if backbone.startswith("gated_vit") else 4  # the ViT pads to whole patches
    for height, width in ((333, 517), (517, 333)):
        images = torch.rand(2, 3, height, width)
        masks = torch.randint(0, 5, (2, height, width))
        logits, aux = model.forward_train(images)
        stride4 = [-(-s // patch) * patch // 4 for s in (height, width)]
        assert logits.shape[:2] == (2, 5) and list(logits.shape[-2:]) == stride4
        loss = torch.nn.functional.cross_entropy(torch.nn.functional.interpolate(logits, (height, width)), masks)
        if aux is not None:
            assert list(aux.shape[-2:]) == [-(-s // 16) for s in (height, width)]
            loss = loss + aux.mean()
        model.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
        with torch.no_grad():
            assert model.eval()(images).shape == (2, 5, height, width)
        model.train()


def test_head_keys_follow_mmseg():
    model = build_segmenter("fpn", "nat_mini", 3, **TINY["nat_mini"])
    keys = set(model.state_dict())
    # Semantic FPN: stride-32 level = 3 x (ConvModule, Upsample); the neck is torchvision's FPN
    assert {"decode_head.scale_heads.3.4.conv.weight", "decode_head.scale_heads.0.0.bn.running_var"} <= keys
    assert "decode_head.scale_heads.0.1.conv.weight" not in keys and "decode_head.conv_seg.bias" in keys
    assert {"backbone.fpn.inner_blocks.3.0.weight", "backbone.fpn.layer_blocks.0.0.bias"} <= keys
    upernet = set(build_segmenter("upernet", "nat_mini", 3, **TINY["nat_mini"]).state_dict())
    assert {"decode_head.psp_modules.3.1.conv.weight", "decode_head.fpn_bottleneck.bn.weight"} <= upernet
    assert {"decode_head.lateral_convs.2.conv.weight", "auxiliary_head.convs.0.conv.weight"} <= upernet
    assert "decode_head.lateral_convs.3.conv.weight" not in upernet  # the last map goes through the PPM
    with pytest.raises(ValueError, match="decoder must be one of upernet, fpn"):
        build_segmenter("deeplab", "nat_mini", 3)


def _metrics(pred, target, k=3):
    return segmentation_metrics(confusion_matrix(torch.tensor(pred), torch.tensor(target), k))


def test_metrics_on_hand_made_confusions():
    perfect = _metrics([[0, 1], [2, 2]], [[0, 1], [2, 2]])
    assert perfect["mIoU"] == perfect["mAcc"] == perfect["aAcc"] == 1.0
    # class 2 in neither prediction nor ground truth: left out of every mean
    absent = _metrics([[0, 0], [1, 1]], [[0, 0], [0, 1]])
    assert absent["mIoU"] == pytest.approx((2 / 3 + 1 / 2) / 2)  # IoU_0 = 2/3, IoU_1 = 1/2
    assert absent["mAcc"] == pytest.approx((2 / 3 + 1) / 2) and absent["aAcc"] == pytest.approx(3 / 4)
    assert absent["per_class"][2] == {"class": "2", "IoU": None, "Acc": None, "gt_pixels": 0, "pred_pixels": 0}
    # predicted but never in the ground truth: IoU 0 counts, accuracy undefined
    false_positive = _metrics([[2, 0]], [[0, 0]])
    assert false_positive["mIoU"] == pytest.approx((1 / 2 + 0) / 2) and false_positive["mAcc"] == 0.5
    # ignored pixels count nowhere, whatever their prediction
    ignored = _metrics([[0, 1, 2, 2]], [[0, 1, 255, 255]])
    assert ignored["mIoU"] == ignored["aAcc"] == 1.0
    assert confusion_matrix(torch.tensor([1, 2]), torch.tensor([255, 255]), 3).sum() == 0
    with pytest.raises(ValueError, match="target holds classes outside"):
        confusion_matrix(torch.tensor([0]), torch.tensor([3]), 3)
    assert math.isnan(segmentation_metrics(torch.zeros(3, 3, dtype=torch.long))["mIoU"])


def test_sliding_window_and_flip_inference():
    torch.manual_seed(0)
    model = build_segmenter("upernet", "nat_mini", 4, channels=16, aux_head=False, **TINY["nat_mini"]).eval()
    image = torch.rand(3, 96, 130)
    whole = segment_image(model, image, 4, mode="whole", test_scale=None)
    covering = segment_image(model, image, 4, mode="slide", test_scale=None, crop_size=(96, 160), stride=(64, 64))
    torch.testing.assert_close(covering, whole)
    torch.testing.assert_close(whole.sum(0), torch.ones(96, 130))
    # a per-pixel model gives the same logits whatever the windows: overlaps are averaged exactly
    pointwise = torch.nn.Conv2d(3, 4, 1)
    images = torch.rand(2, 3, 70, 90)
    with torch.no_grad():
        windows = slide_logits(pointwise, images, 4, crop_size=(32, 40), stride=(21, 17))
        torch.testing.assert_close(windows, pointwise(images))
        flipped = segment_image(pointwise, image, 4, test_scale=None, flip=True)
        torch.testing.assert_close(flipped, segment_image(pointwise, image, 4, test_scale=None))
    assert rescale_size(512, 683, (2048, 512)) == (512, 683)  # an ADE20K image is already at the test scale
    assert rescale_size(300, 4000, (2048, 512)) == (154, 2048)  # the long side binds
    assert rescale_size(300, 400, (1024, 256)) == (256, 341)


def test_iteration_schedules():
    poly = IterationSchedule(1000, "poly", power=1.0, warmup_iters=100, warmup_ratio=1e-6)
    assert poly(0) == pytest.approx(1e-6) and poly(50) == pytest.approx(0.95 * (1 - 0.5 * (1 - 1e-6)))
    assert poly(500) == pytest.approx(0.5) and poly(1000) == 0.0
    cosine = IterationSchedule(1000, "cosine", min_lr_ratio=1e-8)
    assert cosine(0) == 1.0 and cosine(500) == pytest.approx(0.5) and cosine(1000) == pytest.approx(1e-8)
    assert IterationSchedule(100, "poly", power=0.9)(50) == pytest.approx(0.5**0.9)
    with pytest.raises(ValueError, match="lr_schedule must be one of poly, cosine"):
        IterationSchedule(10, "step")
