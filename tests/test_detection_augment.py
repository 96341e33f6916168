"""DETR-style multi-scale crop augmentation: boxes and masks stay aligned with each other and with the image."""

import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes

from attnzoo.recipes.detection import CocoDataModule
from attnzoo.recipes.detection.augment import RandomSizeCrop, train_transform

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


SCALES = (64, 72, 80)  # the 480..800 / 400..600 / 384..600 of the COCO configs, scaled down by 7.5
CROP_SCALES, CROP_SIZE = (53, 67, 80), (51, 80)


def rectangles(height=90, width=140):
    """A PIL image and a target of four filled rectangles (masks) with their exact boxes."""
    boxes = torch.tensor([[4, 6, 40, 30], [50, 10, 130, 80], [100, 60, 138, 88], [20, 50, 70, 85]], dtype=torch.float32)
    masks = torch.zeros(len(boxes), height, width, dtype=torch.uint8)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
        mask[y0:y1, x0:x1] = 1
    target = {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
        "masks": tv_tensors.Mask(masks),
        "labels": torch.tensor([1, 2, 3, 4]),
    }
    return Image.fromarray((torch.rand(height, width, 3) * 255).byte().numpy()), target


def test_detr_crop_keeps_boxes_masks_and_labels_aligned():
    transform = train_transform("detr_crop", SCALES, 1333, 0.5, crop_scales=CROP_SCALES, crop_size=CROP_SIZE)
    counts, short_sides = set(), set()
    for seed in range(40):
        torch.manual_seed(seed)
        image, target = transform(*rectangles())
        boxes, masks, labels = target["boxes"], target["masks"], target["labels"]
        assert image.dtype == torch.float32 and image.shape[-2:] == masks.shape[-2:] == boxes.canvas_size
        assert len(boxes) == len(masks) == len(labels) and set(labels.tolist()) <= {1, 2, 3, 4}
        short_sides.add(min(image.shape[-2:]))
        counts.add(len(boxes))
        if len(boxes):
            assert bool((masks.flatten(1).sum(1) > 0).all())
            # the mask's extent is the box (pixel-exclusive right/bottom edges), up to the nearest-neighbour
            # resampling of the masks by the resizes (half a pixel each, grown by the later upscaling)
            extent = masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0])
            torch.testing.assert_close(extent, boxes.as_subclass(torch.Tensor), atol=2.5, rtol=0)
            height, width = image.shape[-2:]
            assert bool((boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all() and (boxes >= 0).all())
    assert short_sides <= set(SCALES) and len(short_sides) > 1
    assert 4 in counts and min(counts) < 4  # the crop policy drops the boxes outside its window


def test_random_size_crop_draws_within_the_range():
    image, target = rectangles()
    crop = RandomSizeCrop(51, 80)
    sizes = set()
    for seed in range(20):
        torch.manual_seed(seed)
        out, out_target = crop(tv_tensors.Image(torch.zeros(3, 90, 140)), target)
        sizes.add(tuple(out.shape[-2:]))
        assert out_target["masks"].shape[-2:] == out.shape[-2:]
    assert all(51 <= h <= 80 and 51 <= w <= 80 for h, w in sizes) and len(sizes) > 5
    torch.manual_seed(0)
    small = crop(tv_tensors.Image(torch.zeros(3, 40, 140)))  # shorter than the range: the whole height
    assert small.shape[-2] == 40


def test_data_module_selects_the_augmentation():
    crop = CocoDataModule(root="unused", augment="detr_crop").train_transform()
    assert "RandomSizeCrop" in repr(crop) and "RandomChoice" in repr(crop)
    assert "RandomSizeCrop" not in repr(CocoDataModule(root="unused").train_transform())
    with pytest.raises(ValueError, match="augment must be one of"):
        CocoDataModule(root="unused", augment="mosaic")
    with pytest.raises(ValueError, match="crop_size"):
        CocoDataModule(root="unused", augment="detr_crop", crop_size=[600, 384])
