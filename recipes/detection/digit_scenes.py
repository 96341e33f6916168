"""Detection scenes composed from real MNIST digits (the embedded ``mnist_5k`` set of :mod:`attnzoo.recipes.embedded`).

Every scene is a black ``canvas_size x canvas_size`` RGB canvas with a few digits pasted at random positions and
sizes, their square footprints never overlapping. A digit's instance mask is its stroke (resized grey level >= 128),
its box the tight box of the mask, its category the digit class (``"0"`` .. ``"9"``; the demo's choice: the
detector must also recognise the digit) or, with ``single_class=True``, one ``"digit"`` category. Training scenes
use the 4,000 training digits, test scenes the 1,000 held-out ones; each digit is used once before any is reused.
The output is deterministic given ``seed`` and is a COCO-format folder::

    root/annotations/instances_<split>.json   (segmentation as compressed RLE, area = mask area)
    root/<split>/<split>_00000.png ...
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from ..embedded import load_embedded
from .coco_convert import write_coco_json

__all__ = ["DigitScenes", "compose_scene", "write_digit_scenes"]

STROKE_THRESHOLD = 128  # grey level (0..255) from which a resized digit pixel belongs to the stroke
_SPLIT_SEED = {"train": 0, "test": 1}


class DigitScenes:
    """Draws scenes from the digits of ``split``; ``next_digits(n)`` walks a seeded permutation of the split."""

    def __init__(self, split: str, seed: int = 0) -> None:
        if split not in _SPLIT_SEED:
            raise ValueError(f"split must be one of {sorted(_SPLIT_SEED)}, got {split!r}")
        self.images, self.labels = load_embedded("mnist_5k", split)
        self.rng = np.random.default_rng([seed, _SPLIT_SEED[split]])
        self._order = np.empty(0, dtype=np.int64)

    def next_digits(self, count: int) -> list[int]:
        """Indices of the next ``count`` digits (a fresh permutation starts when one is used up)."""
        picked = []
        for _ in range(count):
            if not len(self._order):
                self._order = self.rng.permutation(len(self.labels))
            picked.append(int(self._order[0]))
            self._order = self._order[1:]
        return picked


def _place(rng: np.random.Generator, sizes: list[int], canvas_size: int, tries: int = 50) -> list[tuple[int, int, int]]:
    """Top-left corners and sizes ``(x, y, s)`` of non-overlapping squares; squares that find no room are dropped."""
    placed: list[tuple[int, int, int]] = []
    for s in sizes:
        for _ in range(tries):
            x, y = (int(v) for v in rng.integers(0, canvas_size - s + 1, size=2))
            if all(x + s <= px or px + ps <= x or y + s <= py or py + ps <= y for px, py, ps in placed):
                placed.append((x, y, s))
                break
    return placed


def compose_scene(
    scenes: DigitScenes,
    canvas_size: int,
    digits_per_scene: tuple[int, int],
    digit_size: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One scene: image ``(H, W)`` uint8, masks ``(N, H, W)`` bool (disjoint, non-empty) and classes ``(N,)``."""
    rng = scenes.rng
    count = int(rng.integers(digits_per_scene[0], digits_per_scene[1] + 1))
    sizes = [int(s) for s in rng.integers(digit_size[0], digit_size[1] + 1, size=count)]
    image = np.zeros((canvas_size, canvas_size), dtype=np.uint8)
    masks, classes = [], []
    placed = _place(rng, sizes, canvas_size)
    for index, (x, y, s) in zip(scenes.next_digits(len(placed)), placed):
        digit = np.asarray(Image.fromarray(scenes.images[index]).resize((s, s), Image.BILINEAR))
        image[y : y + s, x : x + s] = digit
        mask = np.zeros_like(image, dtype=bool)
        mask[y : y + s, x : x + s] = digit >= STROKE_THRESHOLD
        if mask.any():
            masks.append(mask)
            classes.append(int(scenes.labels[index]))
    return image, np.stack(masks) if masks else np.zeros((0, *image.shape), bool), np.array(classes, np.int64)


def _annotation(mask: np.ndarray, ann_id: int, image_id: int, category_id: int) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    x0, y0, x1, y1 = int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1  # pixel-edge box
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "area": int(mask.sum()),
        "segmentation": rle,
        "iscrowd": 0,
    }


def write_digit_scenes(
    root: str | os.PathLike,
    split: str,
    num_scenes: int,
    *,
    canvas_size: int = 128,
    digits_per_scene: tuple[int, int] = (2, 4),
    digit_size: tuple[int, int] = (24, 56),
    single_class: bool = False,
    seed: int = 0,
) -> Path:
    """Write ``num_scenes`` scenes of ``split`` (``"train"``: 4,000 training digits, ``"test"``: 1,000 held-out) as
    PNGs under ``root/<split>/`` and their COCO json ``root/annotations/instances_<split>.json`` (returned).
    ``digits_per_scene`` and ``digit_size`` (side in pixels of the resized 28x28 digit) are inclusive ranges."""
    if num_scenes < 1:
        raise ValueError(f"num_scenes must be >= 1, got {num_scenes}")
    lo, hi = digits_per_scene
    if not 1 <= lo <= hi:
        raise ValueError(f"digits_per_scene must be a range (min, max) with 1 <= min <= max, got {digits_per_scene}")
    if not 8 <= digit_size[0] <= digit_size[1] <= canvas_size:
        raise ValueError(
            f"digit_size must be a range (min, max) with 8 <= min <= max <= canvas_size={canvas_size}, got {digit_size}"
        )
    scenes = DigitScenes(split, seed)
    image_dir = Path(root) / split
    image_dir.mkdir(parents=True, exist_ok=True)
    categories = ["digit"] if single_class else [str(c) for c in range(10)]
    images, annotations = [], []
    for image_id in range(1, num_scenes + 1):
        image, masks, classes = compose_scene(scenes, canvas_size, digits_per_scene, digit_size)
        name = f"{split}_{image_id - 1:05d}.png"
        Image.fromarray(image).convert("RGB").save(image_dir / name)
        images.append({"id": image_id, "file_name": name, "width": canvas_size, "height": canvas_size})
        for mask, digit in zip(masks, classes):
            category_id = 1 if single_class else int(digit) + 1
            annotations.append(_annotation(mask, len(annotations) + 1, image_id, category_id))
    coco = {
        "info": {"description": f"attnzoo digit scenes ({split}, seed {seed}) from the embedded MNIST digits"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "digit"} for i, name in enumerate(categories)],
    }
    return write_coco_json(coco, Path(root) / "annotations" / f"instances_{split}.json")
