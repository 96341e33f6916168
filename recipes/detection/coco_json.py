"""Reading and checking COCO-format annotation files before torchvision sees them.

Structural errors (corrupt JSON, missing keys, ids that are not integers, annotations pointing to unknown images or
categories, missing image files, an image whose ``width``/``height`` differ from its file's, an RLE mask pycocotools
cannot decode at the image's size, no annotations at all) raise a ``ValueError`` / ``FileNotFoundError`` naming the
file and the annotation or image id. Fixable problems are repaired or skipped with one counted warning per file: boxes
partly outside the image are clipped to it; boxes with width or height <= 0 (also after clipping), or with non-finite
numbers, are dropped; when masks are used, polygons pycocotools cannot fill (fewer than 3 points, an odd number of
coordinates, non-finite numbers) are dropped, and an annotation left without a polygon is skipped (detectron2's
rule).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = ["check_coco_dict", "images_folder_as_coco", "load_coco_json"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ids(items: list[dict], kind: str, path: str) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for k, item in enumerate(items):
        if not isinstance(item, dict) or "id" not in item:
            raise ValueError(f"{path}: {kind}[{k}] has no 'id'")
        if not _is_int(item["id"]):
            raise ValueError(
                f"{path}: {kind}[{k}] has the id {item['id']!r} ({type(item['id']).__name__}); COCO ids must be "
                "integers (renumber the entries and the annotations' image_id / category_id)"
            )
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


def _file_size(path: str) -> tuple[int, int] | str | None:
    """``(width, height)`` from the image header, ``"missing"`` when there is no such file, ``None`` when the file
    cannot be identified (reported when the image is loaded)."""
    try:
        with Image.open(path) as image:
            return image.size
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return "missing"
    except Exception:  # unreadable: DetectionDataset names it when it loads the pixels
        return None


def _file_sizes(images_dir: str | os.PathLike, images: dict[int, dict]) -> dict[int, tuple[int, int] | str | None]:
    """:func:`_file_size` of every image (header reads only, on threads: I/O bound)."""
    paths = [os.path.join(images_dir, image["file_name"]) for image in images.values()]
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(paths)))) as pool:
        return dict(zip(images, pool.map(_file_size, paths)))


def _rle_counts(counts: str) -> list[int]:
    """The run lengths of a compressed COCO RLE string (pycocotools' format: 6-bit characters from ``'0'``, five value
    bits each, ``0x20`` continues, ``0x10`` on the last character is the sign; runs after the second are deltas to
    the run two before). ValueError when the string is not of that format."""
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(counts):
                raise ValueError("the string ends inside a number")
            code = ord(counts[position]) - 48
            if not 0 <= code < 64:
                raise ValueError(f"character {counts[position]!r} is outside the RLE alphabet '0'..'o'")
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            position, shift = position + 1, shift + 5
            if not more and code & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def _usable_polygons(segmentation: list) -> list:
    """The polygons pycocotools can fill: lists of an even number, at least 6, of finite numbers (3+ points)."""
    return [
        polygon
        for polygon in segmentation
        if isinstance(polygon, list)
        and len(polygon) >= 6
        and len(polygon) % 2 == 0
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in polygon)
    ]


def _rle_problem(rle: dict, width: int, height: int) -> str | None:
    """Why pycocotools cannot make a ``height x width`` mask of the RLE ``rle`` (``None``: it can)."""
    size, counts = rle.get("size"), rle.get("counts")
    if size != [height, width]:
        return f"an RLE of size {size} for a {height}x{width} image (the size must be [height, width])"
    if isinstance(counts, str):
        try:
            runs = _rle_counts(counts)
        except ValueError as err:
            return f"an RLE whose 'counts' string is not compressed RLE: {err}"
    elif isinstance(counts, list) and all(_is_int(c) for c in counts):
        runs = counts
    else:
        return "an RLE whose 'counts' is neither a compressed string nor a list of integers"
    if any(r < 0 for r in runs) or sum(runs) != width * height:
        return f"an RLE whose runs cover {sum(runs)} pixels, not the image's {width}x{height} = {width * height}"
    return None


def check_coco_dict(
    data: Any,
    path: str,
    images_dir: str | os.PathLike,
    *,
    require_annotations: bool = True,
    require_masks: bool = False,
) -> dict[str, Any]:
    """Checked copy of a COCO dict ``data`` read from ``path`` whose images lie in ``images_dir``: ids are integers;
    every image file exists and has the ``width``/``height`` of its file (read from the header); every annotation
    names a known image and category and has a box (clipped to the image, or dropped with a counted warning when
    empty or invalid) and, with ``require_masks``, a ``segmentation`` that pycocotools can turn into a mask of the
    image's size: polygons of at least 3 points (others dropped, an annotation without any skipped, with a counted
    warning) or an RLE of the image's size whose runs cover it (else an error); crowd annotations may lack one only
    if they are not used for masks."""
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
    for image_id, image in images.items():
        if not isinstance(image.get("file_name"), str):
            raise ValueError(f"{path}: image id {image_id} has no 'file_name' string")
        for key in ("width", "height"):
            if not _is_int(image.get(key)) or image[key] < 1:
                raise ValueError(f"{path}: image id {image_id} needs a positive integer {key!r}, got {image.get(key)}")
    sizes = _file_sizes(images_dir, images)
    missing = [f"{images[i]['file_name']} (image id {i})" for i, size in sizes.items() if size == "missing"]
    if missing:
        raise FileNotFoundError(
            f"{path}: {len(missing)} image file(s) missing from {images_dir}: {_few(missing)}; "
            "check the images folder (data.*_images) or the file names in the JSON"
        )
    wrong = [
        f"{images[i]['file_name']} (image id {i}) is {size[0]}x{size[1]}, the JSON says "
        f"{images[i]['width']}x{images[i]['height']}"
        for i, size in sizes.items()
        if isinstance(size, tuple) and size != (images[i]["width"], images[i]["height"])
    ]
    if wrong:
        raise ValueError(
            f"{path}: {len(wrong)} image(s) whose 'width' x 'height' differ from the image file's (width x height in "
            f"pixels): {_few(wrong)}; boxes and masks are placed by these sizes, so correct them in the JSON"
        )
    kept, problems = [], {"clipped": [], "empty": [], "invalid": [], "polygons": [], "no_polygon": []}
    for k, ann in enumerate(annotations):
        if not isinstance(ann, dict) or "id" not in ann:
            raise ValueError(f"{path}: annotations[{k}] has no 'id'")
        for key in ("image_id", "category_id"):
            if not _is_int(ann.get(key)):
                raise ValueError(
                    f"{path}: annotation id {ann['id']} has the {key} {ann.get(key)!r}; COCO ids must be integers"
                )
        if ann.get("image_id") not in images:
            raise ValueError(f"{path}: annotation id {ann['id']} points to unknown image id {ann.get('image_id')!r}")
        if ann.get("category_id") not in categories:
            raise ValueError(
                f"{path}: annotation id {ann['id']} has unknown category id {ann.get('category_id')!r} "
                f"(categories: {_few(sorted(categories))})"
            )
        if require_masks and not ann.get("iscrowd", 0) and not ann.get("segmentation"):
            raise ValueError(f"{path}: annotation id {ann['id']} has no 'segmentation' (Mask R-CNN needs masks)")
        segmentation = ann.get("segmentation")
        if require_masks and segmentation is not None:
            image = images[ann["image_id"]]
            where = f"{path}: annotation id {ann['id']} (image id {ann['image_id']}, {image['file_name']})"
            if isinstance(segmentation, dict):
                problem = _rle_problem(segmentation, image["width"], image["height"])
                if problem is not None:
                    raise ValueError(f"{where} has {problem}")
            elif isinstance(segmentation, list):
                usable = _usable_polygons(segmentation)
                if len(usable) < len(segmentation):
                    problems["polygons" if usable else "no_polygon"].append(ann["id"])
                    if not usable:
                        continue
                    segmentation = usable
            else:
                raise ValueError(
                    f"{where} has a {type(segmentation).__name__} 'segmentation'; expected a list of polygons "
                    "[[x1, y1, x2, y2, x3, y3, ...], ...] or an RLE {'size': [height, width], 'counts': ...}"
                )
        box, problem = _check_box(ann, images[ann["image_id"]])
        if problem is not None:
            problems[problem].append(ann["id"])
        if box is not None:
            area = ann.get("area", box[2] * box[3])  # COCOeval needs the area (box area for box-only files)
            checked = {**ann, "bbox": box, "iscrowd": int(ann.get("iscrowd", 0)), "area": area}
            if segmentation is not None:
                checked["segmentation"] = segmentation
            kept.append(checked)
    notes = {
        "clipped": "boxes partly outside their image clipped to it",
        "empty": "annotations with width or height <= 0 (after clipping to the image) skipped",
        "invalid": "annotations with a missing or non-finite 'bbox' skipped",
        "polygons": "annotations with polygons of fewer than 3 points, an odd number of coordinates or non-finite "
        "numbers: those polygons dropped",
        "no_polygon": "annotations whose polygons all have fewer than 3 points, an odd number of coordinates or "
        "non-finite numbers skipped (masks are used)",
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
    the image headers), for ``predict`` on unannotated photos. Only files count (a sub-folder named ``x.png`` is not
    an image and subfolders are not searched); a file with an image suffix that is not an image is a ValueError
    naming it."""
    folder = Path(images_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"images folder {folder} not found")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"images folder {folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    images = []
    for k, file in enumerate(files, start=1):
        try:
            with Image.open(file) as image:
                width, height = image.size
        except OSError as err:
            raise ValueError(
                f"cannot read image {file}: {err}; the folder to predict may hold only image files "
                f"({', '.join(IMAGE_SUFFIXES)})"
            ) from err
        images.append({"id": k, "file_name": file.name, "width": width, "height": height})
    return {"images": images, "annotations": [], "categories": []}
