"""mmdetection's arithmetic (``ops="mmdet"``), each piece against its definition."""

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from attnzoo.recipes.detection.mmdet_ops import (
    LastLevelP6P7OnInput,
    MMDetAnchorGenerator,
    MMDetRoIAlign,
    paste_masks_grid_sample,
)


def test_roi_align_levels_and_pixel_centres():
    features = OrderedDict((str(k), torch.rand(1, 3, 64 >> k, 80 >> k)) for k in range(4))
    boxes = torch.tensor([[3.0, 4.0, 30.0, 50.0], [0.0, 0.0, 120.0, 200.0], [10.5, 7.25, 250.0, 255.0], [5, 5, 6, 6]])
    pool = MMDetRoIAlign(list(features), 7, strides=[4, 8, 16, 32])
    out = pool(features, [boxes], [(256, 320)])
    for box, pooled in zip(boxes, out):
        scale = math.sqrt((box[2] - box[0]) * (box[3] - box[1]))
        level = min(max(math.floor(math.log2(scale / 56 + 1e-6)), 0), 3)
        expected = roi_align(
            features[str(level)], [box[None]], 7, spatial_scale=1 / 4 / 2**level, sampling_ratio=0, aligned=True
        )[0]
        torch.testing.assert_close(pooled, expected)
    assert pool.levels(boxes).tolist() == [0, 1, 2, 0]


def test_anchors_are_not_rounded():
    anchors = MMDetAnchorGenerator(((32,),), ((0.5, 1.0, 2.0),)).cell_anchors[0]
    half_w, half_h = 16 * math.sqrt(2), 16 / math.sqrt(2)
    expected = torch.tensor(
        [[-half_w, -half_h, half_w, half_h], [-16, -16, 16, 16], [-half_h, -half_w, half_h, half_w]]
    )
    torch.testing.assert_close(anchors, expected)


def test_p6_on_the_backbone_map_and_p7_without_relu():
    torch.manual_seed(0)
    block = LastLevelP6P7OnInput(8, 4)
    c5, p5 = torch.randn(1, 8, 10, 10), torch.randn(1, 4, 10, 10)
    outs, names = block([p5], [c5], ["2"])
    assert names == ["2", "p6", "p7"]
    torch.testing.assert_close(outs[1], block.p6(c5))
    torch.testing.assert_close(outs[2], block.p7(block.p6(c5)))
    assert (outs[1] < 0).any()  # a ReLU before P7 would change P7


def test_mask_paste_equals_sampling_the_whole_image():
    torch.manual_seed(0)
    masks = torch.rand(3, 1, 28, 28)
    boxes = torch.tensor([[10.3, 20.7, 90.2, 61.0], [-5.0, 30.0, 40.0, 99.0], [50.0, 50.0, 52.0, 53.5]])
    pasted = paste_masks_grid_sample(masks, boxes, (80, 100))
    ys, xs = torch.meshgrid(torch.arange(80) + 0.5, torch.arange(100) + 0.5, indexing="ij")
    for mask, box, out in zip(masks, boxes, pasted):
        grid = torch.stack([(xs - box[0]) / (box[2] - box[0]) * 2 - 1, (ys - box[1]) / (box[3] - box[1]) * 2 - 1], -1)
        expected = F.grid_sample(mask[None], grid[None], align_corners=False)[0]
        torch.testing.assert_close(out, expected)
