"""Reading and checking COCO-format annotation files before torchvision sees them.

Structural errors (corrupt JSON, missing keys, annotations pointing to unknown images or categories, missing image
files, no annotations at all) raise a ``ValueError`` / ``FileNotFoundError`` naming the file and the annotation or
image id. Fixable box problems are repaired or skipped with one counted warning per file: boxes partly outside the
image are clipped to it; boxes with width or height <= 0 (also after clipping), or with non-finite numbers, are
dropped.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = ["check_coco_dict", "images_folder_as_coco", "load_coco_json"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _ids(items: list[dict], kind: str, path: str) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for k, item in enumerate(items):
        if not isinstance(item, dict) or "id" not in item:
            raise ValueError(f"{path}: {kind}[{k}] has no 'id'")
        if item["id"] in out:
            raise ValueError(f"{path}: duplicate {kind} id {item['id']}")
        out[item["id"]] = item
    return out


def _few(ids: list[Any]) -> str:
    return ", ".join(str(i) for i in ids[:5]) + (", ..." if len(ids) > 5 else "")


def _check_box(ann: dict, image: dict) -> tuple[list[float] | None, str | None]:
    """``(clipped xywh box or None, problem)``: problem is ``None``, ``"clipped"``, ``"empty"`` or ``"invalid"``."""
    box = ann.get("bbox")
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
        return None, "invalid"
    if not all(math.isfinite(v) for v in box):
        return None, "invalid"
    x, y, w, h = (float(v) for v in box)
    if w <= 0 or h <= 0:
        return None, "empty"
    x0, y0 = max(0.0, x), max(0.0, y)
    x1, y1 = min(float(image["width"]), x + w), min(float(image["height"]), y + h)
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        return None, "empty"
    clipped = [x0, y0, x1 - x0, y1 - y0]
    return clipped, None if clipped == [x, y, w, h] else "clipped"


def check_coco_dict(
    data: Any,
    path: str,
    images_dir: str | os.PathLike,
    *,
    require_annotations: bool = True,
    require_masks: bool = False,
) -> dict[str, Any]:
    """Checked copy of a COCO dict ``data`` read from ``path`` whose images lie in ``images_dir``: every image file
    exists and has ``width``/``height``; every annotation names a known image and category and has a box (clipped
    to the image, or dropped with a counted warning when empty or invalid) and, with ``require_masks``, a
    ``segmentation`` (crowd annotations may lack one only if they are not used for masks)."""
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with 'images', 'annotations', 'categories'")
    for key in ("images", "categories") + (("annotations",) if require_annotations else ()):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path}: missing or non-list {key!r} (COCO format needs images, annotations, categories)")
    images = _ids(data["images"], "images", path)
    categories = _ids(data["categories"], "categories", path)
    annotations = data.get("annotations") or []
    if require_annotations and not categories:
        raise ValueError(f"{path}: the 'categories' list is empty")
    if require_annotations and not annotations:
        raise ValueError(f"{path}: the 'annotations' list is empty; a training or evaluation set needs annotations")
    missing = []
    for image_id, image in images.items():
        if "file_name" not in image:
            raise ValueError(f"{path}: image id {image_id} has no 'file_name'")
        for key in ("width", "height"):
            if not isinstance(image.get(key), int) or image[key] < 1:
                raise ValueError(f"{path}: image id {image_id} needs a positive integer {key!r}, got {image.get(key)}")
        if not os.path.isfile(os.path.join(images_dir, image["file_name"])):
            missing.append(f"{image['file_name']} (image id {image_id})")
    if missing:
        raise FileNotFoundError(
            f"{path}: {len(missing)} image file(s) missing from {images_dir}: {_few(missing)}; "
            "check the images folder (data.*_images) or the file names in the JSON"
        )
    kept, problems = [], {"clipped": [], "empty": [], "invalid": []}
    for k, ann in enumerate(annotations):
        if not isinstance(ann, dict) or "id" not in ann:
            raise ValueError(f"{path}: annotations[{k}] has no 'id'")
        if ann.get("image_id") not in images:
            raise ValueError(f"{path}: annotation id {ann['id']} points to unknown image id {ann.get('image_id')!r}")
        if ann.get("category_id") not in categories:
            raise ValueError(
                f"{path}: annotation id {ann['id']} has unknown category id {ann.get('category_id')!r} "
                f"(categories: {_few(sorted(categories))})"
            )
        if require_masks and not ann.get("iscrowd", 0) and not ann.get("segmentation"):
            raise ValueError(f"{path}: annotation id {ann['id']} has no 'segmentation' (Mask R-CNN needs masks)")
        box, problem = _check_box(ann, images[ann["image_id"]])
        if problem is not None:
            problems[problem].append(ann["id"])
        if box is not None:
            area = ann.get("area", box[2] * box[3])  # COCOeval needs the area (box area for box-only files)
            kept.append({**ann, "bbox": box, "iscrowd": int(ann.get("iscrowd", 0)), "area": area})
    notes = {
        "clipped": "boxes partly outside their image clipped to it",
        "empty": "annotations with width or height <= 0 (after clipping to the image) skipped",
        "invalid": "annotations with a missing or non-finite 'bbox' skipped",
    }
    for kind, ids in problems.items():
        if ids:
            warnings.warn(f"{path}: {len(ids)} {notes[kind]} (annotation ids {_few(ids)})", stacklevel=3)
    if require_annotations and not kept:
        raise ValueError(f"{path}: no usable annotation left after skipping empty and invalid boxes")
    return {**data, "annotations": kept}


def load_coco_json(path: str | os.PathLike, images_dir: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
    """Read and check the COCO annotation file ``path`` (see :func:`check_coco_dict`)."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file {path} not found")
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(f"images folder {images_dir} (for {path}) not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    return check_coco_dict(data, path, images_dir, **kwargs)


def images_folder_as_coco(images_dir: str | os.PathLike) -> dict[str, Any]:
    """A COCO dict without annotations for the image files of a folder (ids 1..N in file-name order; sizes from
    the image headers), for ``predict`` on unannotated photos."""
    folder = Path(images_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"images folder {folder} not found")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"images folder {folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    images = []
    for k, file in enumerate(files, start=1):
        with Image.open(file) as image:
            width, height = image.size
        images.append({"id": k, "file_name": file.name, "width": width, "height": height})
    return {"images": images, "annotations": [], "categories": []}
