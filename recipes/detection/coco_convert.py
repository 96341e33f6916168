"""Convert box annotations to a COCO-format annotation json (``images``, ``annotations``, ``categories``).

Two sources:

- a CSV with the header ``image_path,xmin,ymin,xmax,ymax,label`` (one box per row; DeepForest's layout), and
- Pascal VOC xml files (one per image: ``<filename>``, ``<object><name>``, ``<bndbox>``).

Box coordinates are pixel edges: a box ``(0, 0, W, H)`` covers a whole ``W x H`` image (DeepForest's CSV and xml
files use this). Standard VOC files count pixels from 1 (``xmin=1`` is the first column); pass ``one_based=True``
for them (``xmin``/``ymin`` are then reduced by 1). Image sizes are read from the image files. Output boxes are COCO
``[x, y, width, height]``; ``area`` is the box area; ids count from 1; categories are sorted by name unless
``categories`` gives the order. Every problem (missing image, unknown label, box outside the image or with
width/height <= 0, unreadable row or xml) raises a ``ValueError`` naming the file and the row or object.
"""

from __future__ import annotations

import csv
import json
import os
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, UnidentifiedImageError

__all__ = ["csv_to_coco", "merge_coco", "voc_to_coco", "write_coco_json"]

CSV_COLUMNS = ("image_path", "xmin", "ymin", "xmax", "ymax", "label")


@dataclass(frozen=True)
class _Box:
    image: str  # file name relative to the image folder
    xyxy: tuple[float, float, float, float]
    label: str
    where: str  # "file:row N" / "file:object N" for error messages
    crowd: bool = False


def _image_size(image_dir: Path, name: str, where: str) -> tuple[int, int]:
    path = image_dir / name
    if not path.is_file():
        raise ValueError(f"{where}: image {name!r} not found in image_dir {str(image_dir)!r}")
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{where}: cannot read image {str(path)!r}: {error}") from error


def _check_box(box: _Box, width: int, height: int, clip_to_image: bool) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box.xyxy
    if clip_to_image:
        x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
        y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(
            f"{box.where}: box (xmin, ymin, xmax, ymax) = {box.xyxy} has width or height <= 0"
            + (" inside the image" if clip_to_image else "")
        )
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise ValueError(
            f"{box.where}: box (xmin, ymin, xmax, ymax) = {box.xyxy} lies outside the {width}x{height} image "
            f"{box.image!r} (pass clip_to_image=True to clip boxes to the image)"
        )
    return x0, y0, x1, y1


def _build_coco(
    boxes: Sequence[_Box],
    image_names: Sequence[str],
    image_dir: Path,
    categories: Sequence[str] | None,
    clip_to_image: bool,
    first_where: Mapping[str, str],
    label_map: Mapping[str, str] | None,
) -> dict:
    if label_map:
        boxes = [replace(box, label=label_map.get(box.label, box.label)) for box in boxes]
    if categories is None:
        categories = sorted({box.label for box in boxes})
    else:
        categories = list(categories)
        if len(set(categories)) != len(categories) or not all(isinstance(c, str) and c for c in categories):
            raise ValueError(f"categories must be distinct non-empty strings, got {categories}")
    category_id = {name: i + 1 for i, name in enumerate(categories)}
    image_id, images, sizes = {}, [], {}
    for name in image_names:
        width, height = _image_size(image_dir, name, first_where[name])
        image_id[name] = len(images) + 1
        sizes[name] = (width, height)
        images.append({"id": image_id[name], "file_name": name, "width": width, "height": height})
    annotations = []
    for box in boxes:
        if box.label not in category_id:
            raise ValueError(f"{box.where}: label {box.label!r} is not one of categories {list(categories)}")
        x0, y0, x1, y1 = _check_box(box, *sizes[box.image], clip_to_image)
        w, h = x1 - x0, y1 - y0
        annotations.append(
            {
                "id": len(annotations) + 1,
                "image_id": image_id[box.image],
                "category_id": category_id[box.label],
                "bbox": [x0, y0, w, h],
                "area": w * h,
                "iscrowd": int(box.crowd),
            }
        )
    return {
        "info": {"description": "converted by attnzoo.recipes.detection.coco_convert"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": name, "supercategory": "none"} for name, i in category_id.items()],
    }


def write_coco_json(coco: dict, out_json: str | os.PathLike) -> Path:
    """Write ``coco`` to ``out_json`` atomically (a temporary file renamed into place); returns the path."""
    out = Path(out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(coco))
    tmp.replace(out)
    return out


def _number(text: str | None, where: str, field: str) -> float:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {field} must be a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{where}: {field} must be finite, got {text!r}")
    return value


def csv_to_coco(
    csv_path: str | os.PathLike,
    image_dir: str | os.PathLike,
    out_json: str | os.PathLike | None = None,
    *,
    categories: Sequence[str] | None = None,
    label_map: Mapping[str, str] | None = None,
    rename_images: Mapping[str, str] | None = None,
    clip_to_image: bool = False,
) -> dict:
    """COCO dict of the boxes in ``csv_path`` (header ``image_path,xmin,ymin,xmax,ymax,label``; extra columns are
    ignored); images are looked up in ``image_dir`` under their ``image_path`` (or ``rename_images[image_path]``,
    e.g. ``{"tile.tif": "tile.png"}``). ``label_map`` renames labels (``{"Alive": "Tree", "Dead": "Tree"}`` merges
    two); ``categories`` then names the output categories in id order. Written to ``out_json`` when given."""
    csv_path, image_dir = Path(csv_path), Path(image_dir)
    if not csv_path.is_file():
        raise ValueError(f"csv_path {str(csv_path)!r} is not a file")
    rename_images = dict(rename_images or {})
    boxes, first_where = [], {}
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{csv_path}: header must contain the columns {list(CSV_COLUMNS)}; missing {missing} "
                f"(header: {reader.fieldnames})"
            )
        for row_number, row in enumerate(reader, start=2):  # row 1 is the header
            where = f"{csv_path}:row {row_number}"
            name = (row["image_path"] or "").strip()
            label = (row["label"] or "").strip()
            if not name or not label:
                raise ValueError(f"{where}: image_path and label must be non-empty, got {name!r}, {label!r}")
            name = rename_images.get(name, name)
            xyxy = tuple(_number(row[k], where, k) for k in ("xmin", "ymin", "xmax", "ymax"))
            boxes.append(_Box(name, xyxy, label, where))
            first_where.setdefault(name, where)
    if not boxes:
        raise ValueError(f"{csv_path}: no annotation rows")
    coco = _build_coco(boxes, list(first_where), image_dir, categories, clip_to_image, first_where, label_map)
    if out_json is not None:
        write_coco_json(coco, out_json)
    return coco


def _voc_objects(xml_path: Path, one_based: bool, difficult_as_crowd: bool) -> tuple[str, tuple[int, int], list]:
    try:
        root = ElementTree.parse(xml_path).getroot()
    except ElementTree.ParseError as error:
        raise ValueError(f"{xml_path}: not a valid xml file: {error}") from error
    name = (root.findtext("filename") or "").strip()
    if not name:
        raise ValueError(f"{xml_path}: missing <filename>")
    size = (
        int(_number(root.findtext("size/width", "0"), f"{xml_path}", "size/width")),
        int(_number(root.findtext("size/height", "0"), f"{xml_path}", "size/height")),
    )
    shift = 1.0 if one_based else 0.0
    boxes = []
    for index, obj in enumerate(root.findall("object"), start=1):
        where = f"{xml_path}:object {index}"
        label = (obj.findtext("name") or "").strip()
        if not label:
            raise ValueError(f"{where}: missing <name>")
        if obj.find("bndbox") is None:
            raise ValueError(f"{where}: missing <bndbox>")
        x0, y0, x1, y1 = (_number(obj.findtext(f"bndbox/{k}"), where, k) for k in ("xmin", "ymin", "xmax", "ymax"))
        crowd = difficult_as_crowd and (obj.findtext("difficult") or "0").strip() == "1"
        boxes.append(_Box(name, (x0 - shift, y0 - shift, x1, y1), label, where, crowd))
    return name, size, boxes


def voc_to_coco(
    xml_paths: str | os.PathLike | Iterable[str | os.PathLike],
    image_dir: str | os.PathLike,
    out_json: str | os.PathLike | None = None,
    *,
    categories: Sequence[str] | None = None,
    label_map: Mapping[str, str] | None = None,
    one_based: bool = False,
    difficult_as_crowd: bool = True,
    clip_to_image: bool = False,
) -> dict:
    """COCO dict of Pascal VOC files ``xml_paths`` (a file, a folder of ``*.xml``, or a list of files); images are
    ``image_dir/<filename>``. ``difficult`` objects become ``iscrowd=1`` (ignored in training and evaluation, as in
    VOC's own evaluation) unless ``difficult_as_crowd=False``. ``categories`` and ``label_map`` as in
    :func:`csv_to_coco`. Written to ``out_json`` when given."""
    if isinstance(xml_paths, (str, os.PathLike)):
        path = Path(xml_paths)
        paths = sorted(path.glob("*.xml")) if path.is_dir() else [path]
    else:
        paths = [Path(p) for p in xml_paths]
    if not paths:
        raise ValueError(f"xml_paths holds no xml files: {xml_paths!r}")
    image_dir = Path(image_dir)
    boxes, first_where = [], {}
    for xml_path in paths:
        if not xml_path.is_file():
            raise ValueError(f"xml file {str(xml_path)!r} does not exist")
        name, (width, height), objects = _voc_objects(xml_path, one_based, difficult_as_crowd)
        if name in first_where:
            raise ValueError(f"{xml_path}: image {name!r} is already annotated by {first_where[name]}")
        first_where[name] = str(xml_path)
        actual = _image_size(image_dir, name, str(xml_path))
        if width and height and (width, height) != actual:
            raise ValueError(f"{xml_path}: <size> says {width}x{height} but image {name!r} is {actual[0]}x{actual[1]}")
        boxes.extend(objects)
    if not boxes:
        raise ValueError(f"no <object> in {[str(p) for p in paths]}")
    coco = _build_coco(boxes, list(first_where), image_dir, categories, clip_to_image, first_where, label_map)
    if out_json is not None:
        write_coco_json(coco, out_json)
    return coco


def merge_coco(*cocos: dict, out_json: str | os.PathLike | None = None) -> dict:
    """One COCO dict of several over the same image folder (e.g. a CSV's and a VOC folder's conversions): images and
    annotations renumbered from 1, categories unified by name (sorted). An image file named twice is a ValueError."""
    if not cocos:
        raise ValueError("merge_coco needs at least one COCO dict")
    names = sorted({c["name"] for coco in cocos for c in coco["categories"]})
    category_id = {name: i + 1 for i, name in enumerate(names)}
    images, annotations, seen = [], [], set()
    for index, coco in enumerate(cocos):
        old_name = {c["id"]: c["name"] for c in coco["categories"]}
        new_image = {}
        for image in coco["images"]:
            if image["file_name"] in seen:
                raise ValueError(f"merge_coco: image {image['file_name']!r} appears again in COCO dict {index}")
            seen.add(image["file_name"])
            new_image[image["id"]] = len(images) + 1
            images.append({**image, "id": len(images) + 1})
        for ann in coco["annotations"]:
            category = category_id[old_name[ann["category_id"]]]
            annotations.append(
                {**ann, "id": len(annotations) + 1, "image_id": new_image[ann["image_id"]], "category_id": category}
            )
    merged = {
        "info": {"description": "merged by attnzoo.recipes.detection.coco_convert"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": name, "supercategory": "none"} for name, i in category_id.items()],
    }
    if out_json is not None:
        write_coco_json(merged, out_json)
    return merged
