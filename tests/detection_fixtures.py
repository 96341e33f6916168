"""A tiny synthetic COCO folder for the detection tests: bright squares and disks drawn on dark noise.

Category ids are 3 (square) and 7 (disk), so the contiguous label mapping is exercised; squares carry polygon
segmentations, disks RLE ones; one crowd annotation is added to the first image.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

CATEGORIES = [{"id": 3, "name": "square"}, {"id": 7, "name": "disk"}]
SIZES = [(96, 128), (128, 96), (96, 96), (112, 144)]  # (height, width)


def draw_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, list[dict]]:
    """An image ``(H, W, 3)`` uint8 and its objects (``category_id``, ``mask`` ``(H, W)`` bool, ``polygon``)."""
    image = (rng.random((height, width, 3)) * 60).astype(np.uint8)
    objects = []
    yy, xx = np.mgrid[:height, :width]
    for k in range(int(rng.integers(1, 4))):
        size = int(rng.integers(18, 36))
        x0, y0 = int(rng.integers(0, width - size)), int(rng.integers(0, height - size))
        if k % 2 == 0:
            mask = (xx >= x0) & (xx < x0 + size) & (yy >= y0) & (yy < y0 + size)
            polygon = [x0, y0, x0 + size, y0, x0 + size, y0 + size, x0, y0 + size]
            objects.append({"category_id": 3, "mask": mask, "polygon": [float(v) for v in polygon]})
            color = (230, 80, 40)
        else:
            r = size / 2
            mask = (xx + 0.5 - x0 - r) ** 2 + (yy + 0.5 - y0 - r) ** 2 <= r * r
            objects.append({"category_id": 7, "mask": mask, "polygon": None})
            color = (40, 200, 230)
        image[mask] = color
    return image, objects


def write_shapes_coco(folder: Path, num_images: int = 8, seed: int = 0, name: str = "train") -> tuple[Path, Path]:
    """Write ``<folder>/<name>/*.png`` and ``<folder>/<name>.json``; returns ``(annotation file, image folder)``."""
    rng = np.random.default_rng(seed)
    images_dir = folder / name
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        height, width = SIZES[i % len(SIZES)]
        pixels, objects = draw_scene(rng, height, width)
        file_name = f"{i:03d}.png"
        Image.fromarray(pixels).save(images_dir / file_name)
        image_id = 100 + i
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for obj in objects:
            rle = mask_utils.encode(np.asfortranarray(obj["mask"].astype(np.uint8)))
            x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
            segmentation = [obj["polygon"]] if obj["polygon"] else {**rle, "counts": rle["counts"].decode()}
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": obj["category_id"],
                    "bbox": [x, y, w, h],
                    "area": float(obj["mask"].sum()),
                    "iscrowd": 0,
                    "segmentation": segmentation,
                }
            )
    crowd = dict(annotations[0], id=len(annotations) + 1, iscrowd=1, bbox=[0.0, 0.0, 10.0, 10.0], area=100.0)
    crowd["segmentation"] = [[0.0, 0.0, 10.0, 0.0, 10.0, 10.0, 0.0, 10.0]]
    annotations.append(crowd)
    ann_file = folder / f"{name}.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return ann_file, images_dir
