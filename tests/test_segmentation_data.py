"""Segmentation data: the ADE20K layout with reduce_zero_label, the training augmentation on tv_tensors, and the
errors that bad files give (each naming the file)."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from attnzoo.recipes.segmentation import SegmentationDataModule, SegmentationFolder
from attnzoo.recipes.segmentation.transforms import PhotoMetricDistortion, SegmentationTrainTransform, cat_max_crop


def _pair(folder, stem, mask, image_size=None, mode="L"):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    height, width = image_size or mask.shape[:2]
    rng = np.random.default_rng(len(stem))
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / "images" / f"{stem}.jpg")
    Image.fromarray(mask, mode).save(folder / "masks" / f"{stem}.png")


def test_ade20k_layout_reduces_the_zero_label(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    mask = np.array([[0, 1, 150], [2, 255, 150]], dtype=np.uint8)
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(root / "images" / split / "ADE_0001.jpg")
        Image.fromarray(mask).save(root / "annotations" / split / "ADE_0001.png")
    data = SegmentationDataModule(root=str(tmp_path), num_workers=0)  # the parent folder works too
    data.setup("validate")
    image, target = data.datasets["val"][0]
    assert image.shape == (3, 2, 3) and image.dtype == torch.float32
    assert target["mask"].tolist() == [[255, 0, 149], [1, 255, 149]]
    assert data.class_names[0] == "wall" and data.class_names[149] == "flag" and data.reduce_zero_label


def test_training_transform_crops_pads_and_keeps_masks_aligned():
    torch.manual_seed(0)
    mask = torch.zeros(60, 90, dtype=torch.int64)
    mask[:, 45:] = 1  # left half class 0, right half class 1
    image = torch.zeros(3, 60, 90, dtype=torch.uint8)
    image[:, :, 45:] = 255
    transform = SegmentationTrainTransform(
        crop_size=(64, 64), scale=(90, 60), ratio_range=(0.5, 0.9), photometric=False
    )
    for _ in range(5):
        out, target = transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        assert out.shape == (3, 64, 64) and target.shape == (64, 64) and out.dtype == torch.float32
        labelled = target != 255
        assert not labelled.all()  # resized below 64 px: padded with the ignore label...
        fill = torch.tensor([0.485, 0.456, 0.406])[:, None]
        torch.testing.assert_close(out[:, ~labelled], fill.expand(3, int((~labelled).sum())))  # ...and the mean
        # nearest-neighbour masks stay aligned with the bilinear image away from the boundary
        assert (out[0][labelled & (target == 1)] > 0.9).float().mean() > 0.9
        assert (out[0][labelled & (target == 0)] < 0.1).float().mean() > 0.9
    # cat_max_ratio: a 40 px crop of two 40 px halves is redrawn while one class covers >= 75% of it (about half
    # of the draws); the first draw is kept without the check
    halves = torch.zeros(40, 80, dtype=torch.int64)
    halves[:, 40:] = 1
    checked, unchecked = [], []
    for seed in range(10):
        for ratio, found in ((0.75, checked), (1.0, unchecked)):
            torch.manual_seed(seed)
            top, left, height, width = cat_max_crop(halves, (40, 40), ratio, 255)
            assert (top, height, width) == (0, 40, 40)
            found.append(0.25 < (halves[:, left : left + 40] == 1).float().mean() < 0.75)
    assert all(checked) and not all(unchecked)
    # the HSV saturation scaling keeps hue and value and caps saturation at 1
    rgb = torch.tensor([0.8, 0.4, 0.2]).view(3, 1, 1)
    assert PhotoMetricDistortion.scale_saturation(rgb, 0.5).flatten().tolist() == pytest.approx([0.8, 0.6, 0.5])
    assert PhotoMetricDistortion.scale_saturation(rgb, 3.0).flatten().tolist() == pytest.approx(
        [0.8, 0.26667, 0.0], abs=1e-4
    )


def test_bad_data_errors_name_the_file(tmp_path):
    good = np.array([[0, 1], [2, 1]], dtype=np.uint8)

    def folder(name):
        return SegmentationFolder(tmp_path / name / "images", tmp_path / name / "masks", num_classes=3)

    _pair(tmp_path / "missing", "a", good)
    (tmp_path / "missing" / "masks" / "a.png").rename(tmp_path / "missing" / "masks" / "b.png")
    with pytest.raises(ValueError, match=r"1 of 1 images have no mask: .*a\.jpg has no mask .*a\.png"):
        folder("missing")
    _pair(tmp_path / "size", "a", good, image_size=(3, 2))
    with pytest.raises(ValueError, match=r"mask .*a\.png is 2x2 px but its image .*a\.jpg is 2x3 px"):
        folder("size")[0]
    _pair(tmp_path / "values", "a", np.array([[0, 7], [255, 1]], dtype=np.uint8))
    with pytest.raises(ValueError, match=r"mask .*a\.png holds class values \[7\] outside \[0, 3\)"):
        folder("values")[0]
    _pair(tmp_path / "rgb", "a", np.zeros((2, 2, 3), np.uint8), mode="RGB")
    with pytest.raises(ValueError, match=r"mask .*a\.png is a RGB image; masks must be index PNGs"):
        folder("rgb")[0]
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "masks").mkdir()
    with pytest.raises(ValueError, match=r"image folder .*empty/images holds no images"):
        folder("empty")
    _pair(tmp_path / "corrupt", "a", good)
    (tmp_path / "corrupt" / "masks" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(ValueError, match=r"cannot read mask .*corrupt/masks/a\.png"):
        folder("corrupt")[0]
    with pytest.raises(ValueError, match="ignore_index 2 is a class index"):
        SegmentationDataModule(train_images="x", train_masks="y", num_classes=3, ignore_index=2)
