"""Digit scenes: COCO folders composed from the embedded MNIST digits."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2

from attnzoo.recipes.detection.digit_scenes import write_digit_scenes
from attnzoo.recipes.embedded import load_embedded

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools on numpy 2


def _digest(root, split) -> str:
    files = sorted((root / split).glob("*.png")) + [root / "annotations" / f"instances_{split}.json"]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def test_scenes_are_consistent_coco(tmp_path):
    ann = write_digit_scenes(tmp_path, "train", 12, canvas_size=96, digit_size=(20, 40), digits_per_scene=(2, 4))
    coco = json.loads(ann.read_text())
    assert [c["name"] for c in coco["categories"]] == [str(d) for d in range(10)]
    assert len(coco["images"]) == 12
    per_image = {im["id"]: [a for a in coco["annotations"] if a["image_id"] == im["id"]] for im in coco["images"]}
    assert all(2 <= len(anns) <= 4 for anns in per_image.values())  # 3 squares of <= 40 px always fit in 96 px
    for im in coco["images"]:
        pixels = np.asarray(Image.open(tmp_path / "train" / im["file_name"]))
        assert pixels.shape == (96, 96, 3) and im["width"] == im["height"] == 96
        union = np.zeros((96, 96), bool)
        for a in per_image[im["id"]]:
            mask = mask_utils.decode(a["segmentation"]).astype(bool)
            assert a["area"] == mask.sum() > 0 and a["iscrowd"] == 0
            ys, xs = np.nonzero(mask)
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
            assert not (union & mask).any()  # instances are disjoint
            union |= mask
            assert (pixels[mask][:, 0] >= 128).all()  # the mask is the bright stroke
        assert (pixels[~union] < 128).all()  # nothing bright outside the masks
    dataset = wrap_dataset_for_transforms_v2(CocoDetection(str(tmp_path / "train"), str(ann)), target_keys={"masks"})
    first = [mask_utils.decode(a["segmentation"]) for a in per_image[coco["images"][0]["id"]]]
    assert dataset[0][1]["masks"].numpy().tolist() == np.stack(first).tolist()


def test_scenes_are_deterministic_and_seeded(tmp_path):
    write_digit_scenes(tmp_path / "a", "test", 4, canvas_size=64, digit_size=(16, 30))
    write_digit_scenes(tmp_path / "b", "test", 4, canvas_size=64, digit_size=(16, 30))
    write_digit_scenes(tmp_path / "c", "test", 4, canvas_size=64, digit_size=(16, 30), seed=1)
    assert _digest(tmp_path / "a", "test") == _digest(tmp_path / "b", "test") != _digest(tmp_path / "c", "test")


def test_each_digit_is_used_once_and_splits_stay_apart(tmp_path):
    """The scenes of a split paste distinct digits of that split: every pasted 28x28 digit, resized back from the
    scene at its native size, is found exactly once among the split's digits and never among the other split's."""
    for split, other in (("train", "test"), ("test", "train")):
        ann = write_digit_scenes(tmp_path, split, 30, canvas_size=112, digit_size=(28, 28), digits_per_scene=(3, 3))
        coco = json.loads(ann.read_text())
        digits, labels = load_embedded("mnist_5k", split)
        foreign, _ = load_embedded("mnist_5k", other)
        known = {d.tobytes(): int(c) for d, c in zip(digits, labels)}
        foreign = {d.tobytes() for d in foreign}
        seen = []
        for a in coco["annotations"]:
            image = np.asarray(Image.open(tmp_path / split / f"{split}_{a['image_id'] - 1:05d}.png"))[..., 0]
            x, y, w, h = a["bbox"]
            mask = mask_utils.decode(a["segmentation"]).astype(bool)
            # locate the 28x28 paste: the one window over the stroke whose content is a known digit
            hits = [
                image[y0 : y0 + 28, x0 : x0 + 28].tobytes()
                for y0 in range(max(0, y + h - 28), min(y, 112 - 28) + 1)
                for x0 in range(max(0, x + w - 28), min(x, 112 - 28) + 1)
                if image[y0 : y0 + 28, x0 : x0 + 28].tobytes() in known
            ]
            assert len(hits) >= 1 and mask.any()
            assert known[hits[0]] == a["category_id"] - 1 and hits[0] not in foreign
            seen.append(hits[0])
        assert len(seen) == len(set(seen)) == 90


def test_single_class_and_bad_arguments(tmp_path):
    coco = json.loads(
        write_digit_scenes(tmp_path, "train", 3, canvas_size=64, digit_size=(16, 30), single_class=True).read_text()
    )
    assert coco["categories"] == [{"id": 1, "name": "digit", "supercategory": "digit"}]
    assert {a["category_id"] for a in coco["annotations"]} == {1}
    with pytest.raises(ValueError, match="split must be one of"):
        write_digit_scenes(tmp_path, "val", 1)
    with pytest.raises(ValueError, match="num_scenes must be >= 1"):
        write_digit_scenes(tmp_path, "train", 0)
    with pytest.raises(ValueError, match="digits_per_scene must be a range"):
        write_digit_scenes(tmp_path, "train", 1, digits_per_scene=(3, 2))
    with pytest.raises(ValueError, match="digit_size must be a range"):
        write_digit_scenes(tmp_path, "train", 1, canvas_size=64, digit_size=(16, 80))
