"""CSV / Pascal VOC -> COCO conversion on the real DeepForest tiles, and its input validation."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from attnzoo.recipes.detection.coco_convert import csv_to_coco, merge_coco, voc_to_coco

DATA = Path(__file__).parent / "data" / "deepforest"
OSBS = {"OSBS_029.tif": "OSBS_029.png"}  # the csv names the GeoTIFF; the PNG of the same tile is shipped


def _csv_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_csv_to_coco_matches_the_rows(tmp_path):
    out = tmp_path / "ann" / "osbs.json"
    coco = csv_to_coco(DATA / "OSBS_029.csv", DATA, out, rename_images=OSBS)
    assert json.loads(out.read_text()) == coco
    assert coco["images"] == [{"id": 1, "file_name": "OSBS_029.png", "width": 400, "height": 400}]
    assert [c["name"] for c in coco["categories"]] == ["Tree"]
    rows = _csv_rows(DATA / "OSBS_029.csv")
    assert len(coco["annotations"]) == len(rows) == 61
    for ann, row in zip(coco["annotations"], rows):
        x0, y0, x1, y1 = (float(row[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
        assert ann["bbox"] == [x0, y0, x1 - x0, y1 - y0]
        assert ann["area"] == (x1 - x0) * (y1 - y0)
        assert ann["iscrowd"] == 0 and ann["image_id"] == 1 and ann["category_id"] == 1
    assert sorted(a["id"] for a in coco["annotations"]) == list(range(1, 62))


def test_voc_to_coco_reads_objects_and_categories(tmp_path):
    coco = voc_to_coco(DATA / "SOAP_061.xml", DATA)
    assert coco["images"][0]["file_name"] == "SOAP_061.png"
    assert [c["name"] for c in coco["categories"]] == ["Alive", "Dead"]
    labels = [coco["categories"][a["category_id"] - 1]["name"] for a in coco["annotations"]]
    assert labels.count("Alive") == 9 and labels.count("Dead") == 28
    assert coco["annotations"][0]["bbox"] == [149.0, 105.0, 24.0, 24.0]  # first <object>: 149,105 - 173,129
    one_based = voc_to_coco([DATA / "SOAP_061.xml"], DATA, one_based=True, categories=["Dead", "Alive"])
    assert one_based["annotations"][0]["bbox"] == [148.0, 104.0, 25.0, 25.0]
    assert one_based["annotations"][0]["category_id"] == 1


def test_converted_json_loads_in_torchvision_and_pycocotools(tmp_path):
    from pycocotools.coco import COCO
    from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2

    out = csv_to_coco(DATA / "OSBS_029.csv", DATA, tmp_path / "osbs.json", rename_images=OSBS)
    dataset = wrap_dataset_for_transforms_v2(CocoDetection(str(DATA), str(tmp_path / "osbs.json")))
    image, target = dataset[0]
    assert image.size == (400, 400)
    first = out["annotations"][0]["bbox"]
    torch.testing.assert_close(
        target["boxes"][0], torch.tensor([first[0], first[1], first[0] + first[2], first[1] + first[3]])
    )
    assert target["labels"].tolist() == [1] * 61
    assert len(COCO(str(tmp_path / "osbs.json")).getAnnIds(imgIds=[1])) == 61


def _write_csv(path: Path, rows: list[list]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_path", "xmin", "ymin", "xmax", "ymax", "label"])
        writer.writerows(rows)
    return path


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([["missing.png", 1, 1, 5, 5, "Tree"]], r"row 2: image 'missing.png' not found"),
        ([["a.png", 1, 1, 5, 5, "Tree"], ["a.png", 5, 1, 5, 9, "Tree"]], r"row 3: .* width or height <= 0"),
        ([["a.png", 1, 1, 17, 5, "Tree"]], r"row 2: .* outside the 16x12 image 'a.png'"),
        ([["a.png", 1, "one", 5, 5, "Tree"]], r"row 2: ymin must be a number, got 'one'"),
        ([["a.png", 1, 1, 5, 5, ""]], r"row 2: image_path and label must be non-empty"),
        ([["a.png", 1, 1, 5, 5, "Bush"]], r"row 2: label 'Bush' is not one of categories \['Tree'\]"),
        ([], r"no annotation rows"),
    ],
)
def test_csv_errors_name_the_row(tmp_path, rows, message):
    Image.new("RGB", (16, 12)).save(tmp_path / "a.png")
    path = _write_csv(tmp_path / "boxes.csv", rows)
    categories = ["Tree"] if any(r[-1] == "Bush" for r in rows) else None
    with pytest.raises(ValueError, match=message):
        csv_to_coco(path, tmp_path, categories=categories)


def test_csv_errors_for_header_corrupt_image_and_clip(tmp_path):
    (tmp_path / "bad.csv").write_text("path,x0,y0,x1,y1,label\n")
    with pytest.raises(ValueError, match=r"missing \['image_path', 'xmin', 'ymin', 'xmax', 'ymax'\]"):
        csv_to_coco(tmp_path / "bad.csv", tmp_path)
    (tmp_path / "corrupt.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"row 2: cannot read image"):
        csv_to_coco(_write_csv(tmp_path / "c.csv", [["corrupt.png", 0, 0, 1, 1, "Tree"]]), tmp_path)
    Image.new("RGB", (16, 12)).save(tmp_path / "a.png")
    overhanging = _write_csv(tmp_path / "d.csv", [["a.png", -3, 2, 20, 14, "Tree"]])
    clipped = csv_to_coco(overhanging, tmp_path, clip_to_image=True)
    assert clipped["annotations"][0]["bbox"] == [0.0, 2.0, 16.0, 10.0]
    with pytest.raises(ValueError, match=r"width or height <= 0 inside the image"):
        csv_to_coco(_write_csv(tmp_path / "e.csv", [["a.png", 17, 2, 20, 9, "Tree"]]), tmp_path, clip_to_image=True)


def test_voc_errors_name_the_file_and_object(tmp_path):
    shutil.copy(DATA / "SOAP_061.png", tmp_path / "SOAP_061.png")
    text = (DATA / "SOAP_061.xml").read_text()
    (tmp_path / "bad_box.xml").write_text(text.replace("<xmax>173</xmax>", "<xmax>140</xmax>", 1))
    with pytest.raises(ValueError, match=r"bad_box.xml:object 1: .* width or height <= 0"):
        voc_to_coco(tmp_path / "bad_box.xml", tmp_path)
    (tmp_path / "bad_size.xml").write_text(text.replace("<width>400</width>", "<width>500</width>"))
    with pytest.raises(ValueError, match=r"bad_size.xml: <size> says 500x400 but image 'SOAP_061.png' is 400x400"):
        voc_to_coco(tmp_path / "bad_size.xml", tmp_path)
    (tmp_path / "corrupt.xml").write_text(text[:300])
    with pytest.raises(ValueError, match=r"corrupt.xml: not a valid xml file"):
        voc_to_coco(tmp_path / "corrupt.xml", tmp_path)
    (tmp_path / "other.xml").write_text(text.replace("SOAP_061.png", "nowhere.png"))
    with pytest.raises(ValueError, match=r"other.xml: image 'nowhere.png' not found"):
        voc_to_coco(tmp_path / "other.xml", tmp_path)
    with pytest.raises(ValueError, match=r"already annotated by"):
        voc_to_coco([DATA / "SOAP_061.xml", DATA / "SOAP_061.xml"], DATA)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"holds no xml files"):
        voc_to_coco(tmp_path / "empty", tmp_path)


def test_voc_difficult_objects_become_crowd(tmp_path):
    text = (DATA / "SOAP_061.xml").read_text().replace("<difficult>0</difficult>", "<difficult>1</difficult>", 1)
    (tmp_path / "d.xml").write_text(text)
    crowd = voc_to_coco(tmp_path / "d.xml", DATA)
    assert [a["iscrowd"] for a in crowd["annotations"]][:2] == [1, 0]
    assert voc_to_coco(tmp_path / "d.xml", DATA, difficult_as_crowd=False)["annotations"][0]["iscrowd"] == 0


def test_label_map_and_merge_give_one_tree_dataset(tmp_path):
    trees = {"Alive": "Tree", "Dead": "Tree"}
    osbs = csv_to_coco(DATA / "OSBS_029.csv", DATA, rename_images=OSBS)
    soap = voc_to_coco(DATA / "SOAP_061.xml", DATA, label_map=trees)
    assert [c["name"] for c in soap["categories"]] == ["Tree"]
    merged = merge_coco(osbs, soap, out_json=tmp_path / "trees.json")
    assert json.loads((tmp_path / "trees.json").read_text()) == merged
    assert [(im["id"], im["file_name"]) for im in merged["images"]] == [(1, "OSBS_029.png"), (2, "SOAP_061.png")]
    assert [a["id"] for a in merged["annotations"]] == list(range(1, 99))
    assert [a["image_id"] for a in merged["annotations"]] == [1] * 61 + [2] * 37
    assert merged["annotations"][61]["bbox"] == soap["annotations"][0]["bbox"]
    both = merge_coco(osbs, voc_to_coco(DATA / "SOAP_061.xml", DATA))  # categories unified by name
    assert [c["name"] for c in both["categories"]] == ["Alive", "Dead", "Tree"]
    assert {a["category_id"] for a in both["annotations"][:61]} == {3}
    with pytest.raises(ValueError, match="image 'OSBS_029.png' appears again in COCO dict 1"):
        merge_coco(osbs, osbs)
    with pytest.raises(ValueError, match="label 'Dead' is not one of categories"):
        voc_to_coco(DATA / "SOAP_061.xml", DATA, label_map={"Alive": "Tree"}, categories=["Tree"])
