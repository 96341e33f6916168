"""CocoDataModule: batches, label mapping, crowd handling, augmentation that moves boxes and masks, bad input."""

import json
import warnings

import pytest
import torch
from detection_fixtures import CATEGORIES, write_shapes_coco

from attnzoo.recipes.detection import CocoDataModule
from attnzoo.recipes.detection.coco_json import load_coco_json


def make_dm(ann, images, **kwargs):
    defaults = dict(
        train_ann=str(ann),
        train_images=str(images),
        val_ann=str(ann),
        val_images=str(images),
        batch_size=2,
        num_workers=0,
        train_scales=(96, 128),
        train_max_size=160,
        with_masks=True,
    )
    return CocoDataModule(**{**defaults, **kwargs})


def test_training_batches_move_boxes_and_masks_together(tmp_path):
    ann, images = write_shapes_coco(tmp_path, 8)
    dm = make_dm(ann, images)
    dm.setup("fit")
    assert dm.num_classes == 2 and dm.category_ids == [3, 7]
    loader = dm.train_dataloader()
    loader.batch_sampler.set_epoch(0)
    seen = 0
    for batch_images, targets in loader:
        shapes = {tuple(x.shape[1:]) for x in batch_images}
        ratios = {(w >= h) for h, w in shapes}
        assert len(ratios) == 1  # aspect-ratio grouped: all portrait or all landscape
        for image, target in zip(batch_images, targets):
            assert image.dtype == torch.float32 and image.min() >= 0 and image.max() <= 1
            short, long = sorted(image.shape[1:])
            assert (short in (96, 128) or long == 160) and long <= 160  # a train scale, long side capped
            assert set(target["labels"].tolist()) <= {1, 2}  # contiguous labels, no crowd box
            assert target["masks"].shape[1:] == image.shape[1:]
            for box, mask in zip(target["boxes"], target["masks"]):
                ys, xs = torch.nonzero(mask, as_tuple=True)
                mask_box = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
                torch.testing.assert_close(box, mask_box, atol=1.5, rtol=0)  # resized/flipped together
            seen += 1
    assert seen == 8


def test_crowd_is_kept_for_evaluation_and_labels_map_back(tmp_path):
    ann, images = write_shapes_coco(tmp_path, 4)
    dm = make_dm(ann, images, with_masks=False, eval_batch_size=2)
    dm.setup("validate")
    gt = dm.coco_gt["val"]
    assert sum(a["iscrowd"] for a in gt.dataset["annotations"]) == 1
    batch_images, targets, real = next(iter(dm.val_dataloader()))
    assert real.tolist() == [True, True]
    assert tuple(batch_images[0].shape[1:]) == (96, 128)  # evaluation images keep their file size
    assert "masks" not in targets[0]
    first = json.loads(ann.read_text())["annotations"][0]
    label = targets[0]["labels"][0].item()
    assert dm.category_ids[label - 1] == first["category_id"]


def test_resumable_augmentation_is_a_function_of_epoch_and_index(tmp_path):
    ann, images = write_shapes_coco(tmp_path, 4)
    dm = make_dm(ann, images)
    dm.setup("fit")
    dataset = dm.datasets["train"]
    a, b = dataset[(3, 1)], dataset[(3, 1)]
    torch.testing.assert_close(a[0], b[0])
    sizes = {tuple(dataset[(epoch, 1)][0].shape) for epoch in range(8)}
    assert len(sizes) > 1  # the scale changes with the epoch


def _write(tmp_path, data):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path


def _base(tmp_path):
    ann, images = write_shapes_coco(tmp_path, 2)
    return json.loads(ann.read_text()), images


def test_corrupt_json_names_the_file(tmp_path):
    _, images = _base(tmp_path)
    path = tmp_path / "broken.json"
    path.write_text('{"images": [')
    with pytest.raises(ValueError, match=r"broken\.json is not valid JSON"):
        load_coco_json(path, images)
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        load_coco_json(tmp_path / "nothere.json", images)


def test_missing_image_file_names_file_and_id(tmp_path):
    data, images = _base(tmp_path)
    (images / data["images"][1]["file_name"]).unlink()
    with pytest.raises(FileNotFoundError, match=r"bad\.json: 1 image file\(s\) missing .*001\.png \(image id 101\)"):
        make_dm(_write(tmp_path, data), images).setup("fit")


def test_unreadable_image_file_names_file_and_id(tmp_path):
    data, images = _base(tmp_path)
    (images / data["images"][0]["file_name"]).write_bytes(b"not a png")
    dm = make_dm(_write(tmp_path, data), images)
    dm.setup("validate")
    with pytest.raises(ValueError, match=r"cannot read image .*000\.png \(image id 100\)"):
        next(iter(dm.val_dataloader()))


def test_unknown_image_or_category_names_the_annotation(tmp_path):
    data, images = _base(tmp_path)
    data["annotations"][0]["image_id"] = 999
    with pytest.raises(ValueError, match=r"annotation id 1 points to unknown image id 999"):
        make_dm(_write(tmp_path, data), images).setup("fit")
    data, images = _base(tmp_path)
    data["annotations"][1]["category_id"] = 5
    with pytest.raises(ValueError, match=r"bad\.json: annotation id 2 has unknown category id 5"):
        make_dm(_write(tmp_path, data), images).setup("validate")


def test_empty_annotation_list_is_an_error(tmp_path):
    data, images = _base(tmp_path)
    data["annotations"] = []
    with pytest.raises(ValueError, match=r"bad\.json: the 'annotations' list is empty"):
        make_dm(_write(tmp_path, data), images).setup("fit")


def test_degenerate_and_outside_boxes_are_counted_and_skipped_or_clipped(tmp_path):
    data, images = _base(tmp_path)
    anns = data["annotations"]
    anns[0]["bbox"] = [10, 10, 0, 5]  # zero width
    anns[1]["bbox"] = [10, 10, 5, -3]  # negative height
    anns[2]["bbox"] = [500, 500, 10, 10]  # entirely outside the image
    anns[-2]["bbox"] = [-5, -5, 20, 20]  # partly outside: clipped
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checked = load_coco_json(_write(tmp_path, data), images, require_masks=True)
    text = " | ".join(str(w.message) for w in caught)
    assert "3 annotations with width or height <= 0" in text and "annotation ids 1, 2, 3" in text
    assert "1 boxes partly outside their image clipped" in text
    kept = {a["id"]: a for a in checked["annotations"]}
    assert len(kept) == len(anns) - 3 and kept[anns[-2]["id"]]["bbox"] == [0.0, 0.0, 15.0, 15.0]
    dm = make_dm(_write(tmp_path, data), images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm.setup("fit")
    for _, target in dm.datasets["train"]:
        assert bool((target["boxes"][:, 2:] > target["boxes"][:, :2]).all())


def test_masks_required_for_mask_rcnn(tmp_path):
    data, images = _base(tmp_path)
    del data["annotations"][0]["segmentation"]
    with pytest.raises(ValueError, match=r"annotation id 1 has no 'segmentation'"):
        make_dm(_write(tmp_path, data), images).setup("fit")
    make_dm(_write(tmp_path, data), images, with_masks=False).setup("fit")  # boxes only: fine


def test_categories_must_match_between_splits(tmp_path):
    ann, images = write_shapes_coco(tmp_path, 2)
    data = json.loads(ann.read_text())
    data["categories"] = [*CATEGORIES, {"id": 9, "name": "extra"}]
    with pytest.raises(ValueError, match="differ from the training categories"):
        make_dm(ann, images, val_ann=str(_write(tmp_path, data))).setup("fit")


def test_predict_on_an_unannotated_folder(tmp_path):
    _, images = write_shapes_coco(tmp_path, 3)
    dm = CocoDataModule(predict_images=str(images), num_workers=0, eval_batch_size=2)
    dm.setup("predict")
    batch_images, targets, real = next(iter(dm.predict_dataloader()))
    assert [t["image_id"] for t in targets] == [1, 2] and len(batch_images) == 2
    with pytest.raises(ValueError, match="data.train_images is not set"):
        CocoDataModule(num_workers=0).setup("fit")
    with pytest.raises(ValueError, match="hflip"):
        CocoDataModule(hflip=2.0)


def test_image_sizes_must_match_the_image_files(tmp_path):
    data, images = _base(tmp_path)
    data["images"][1]["width"] *= 2  # 101 is 96 x 128 (w x h): predictions equal to the truth would score 0
    with pytest.raises(ValueError, match=r"bad\.json: 1 image\(s\) whose 'width' x 'height' differ .*001\.png "
                                         r"\(image id 101\) is 96x128, the JSON says 192x128"):  # fmt: skip
        load_coco_json(_write(tmp_path, data), images)
    data, images = _base(tmp_path)
    data["images"][0]["height"] //= 2  # under-stated: boxes would be clipped or dropped, blamed on the boxes
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no box warning comes first
        with pytest.raises(ValueError, match=r"000\.png \(image id 100\) is 128x96, the JSON says 128x48"):
            make_dm(_write(tmp_path, data), images).setup("fit")


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools on numpy 2
def test_segmentations_pycocotools_cannot_read_are_dropped_or_name_the_annotation(tmp_path):
    data, images = _base(tmp_path)
    polygons = [a for a in data["annotations"] if isinstance(a["segmentation"], list) and not a["iscrowd"]]
    rle = next(a for a in data["annotations"] if isinstance(a["segmentation"], dict))
    good = polygons[0]["segmentation"][0]
    polygons[0]["segmentation"] = [[1.0, 2.0, 3.0, 4.0], good, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]]  # 2 of 3 bad
    polygons[1]["segmentation"] = [[1.0, 2.0, float("nan"), 4.0, 5.0, 6.0], []]  # none usable
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm = make_dm(_write(tmp_path, data), images)
        dm.setup("fit")
    text = " | ".join(str(w.message) for w in caught)
    dropped = "1 annotations with polygons of fewer than 3 points, an odd number of coordinates or non-finite numbers"
    assert f"{dropped}: those polygons dropped (annotation ids {polygons[0]['id']})" in text
    assert "1 annotations whose polygons all have fewer than 3 points" in text and f"ids {polygons[1]['id']})" in text
    kept = {a["id"]: a for a in dm.datasets["train"].base.coco.dataset["annotations"]}
    assert kept[polygons[0]["id"]]["segmentation"] == [good] and polygons[1]["id"] not in kept
    for index in range(len(dm.datasets["train"])):  # every mask is made (pycocotools crashed here mid-epoch)
        dm.datasets["train"][index]

    broken = {
        "'counts' string is not compressed RLE": {**rle["segmentation"], "counts": "zz!!"},
        "an RLE of size \\[5, 5\\]": {**rle["segmentation"], "size": [5, 5]},
        "runs cover 0 pixels": {**rle["segmentation"], "counts": ""},
    }
    for message, segmentation in broken.items():
        saved, rle["segmentation"] = rle["segmentation"], segmentation
        match = rf"bad\.json: annotation id {rle['id']} \(image id {rle['image_id']}, .*\) has .*{message}"
        with pytest.raises(ValueError, match=match):
            make_dm(_write(tmp_path, data), images).setup("fit")
        rle["segmentation"] = saved
    # unchecked annotations (a predict split reads masks without requiring them) are blamed, not the image
    rle["segmentation"] = {**rle["segmentation"], "counts": "zz!!"}
    dm = make_dm(_write(tmp_path, data), images, predict_ann=str(tmp_path / "bad.json"), predict_images=str(images))
    dm.setup("predict")
    index = dm.datasets["predict"].base.ids.index(rle["image_id"])
    with pytest.raises(ValueError, match=rf"cannot turn the annotations of image id {rle['image_id']} .* into targets"):
        dm.datasets["predict"][index]


def test_ids_must_be_integers(tmp_path):
    data, images = _base(tmp_path)
    for image in data["images"]:
        image["id"] = f"img{image['id']}"
    with pytest.raises(ValueError, match=r"bad\.json: images\[0\] has the id 'img100' \(str\); COCO ids must be int"):
        make_dm(_write(tmp_path, data), images).setup("fit")
    data, images = _base(tmp_path)
    data["annotations"][0]["category_id"] = "3"
    with pytest.raises(ValueError, match=r"annotation id 1 has the category_id '3'; COCO ids must be integers"):
        make_dm(_write(tmp_path, data), images).setup("fit")


def test_a_training_set_of_crowd_annotations_only_is_named(tmp_path):
    data, images = _base(tmp_path)
    for annotation in data["annotations"]:
        annotation["iscrowd"] = 1
    with pytest.raises(ValueError, match=r"bad\.json: no training image has an annotation with iscrowd 0"):
        make_dm(_write(tmp_path, data), images).setup("fit")


def test_a_folder_named_like_an_image_is_not_predicted(tmp_path):
    _, images = write_shapes_coco(tmp_path, 2)
    (images / "x.png").mkdir()
    dm = CocoDataModule(predict_images=str(images), num_workers=0)
    dm.setup("predict")
    assert [im["file_name"] for im in dm.datasets["predict"].base.coco.dataset["images"]] == ["000.png", "001.png"]
    (images / "y.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"cannot read image .*y\.jpg: .* may hold only image files"):
        CocoDataModule(predict_images=str(images), num_workers=0).setup("predict")


def test_aspect_ratio_bins_are_bounded():
    for bins in ([1e9], [0.75, 100.0], [0.01]):
        with pytest.raises(ValueError, match=r"aspect_ratio_bins must hold width/height ratios in \[1/8, 8\]"):
            CocoDataModule(aspect_ratio_bins=bins)
    CocoDataModule(aspect_ratio_bins=[0.125, 1.0, 8.0])
