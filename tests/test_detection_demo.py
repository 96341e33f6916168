"""``attnzoo demo detection``, shortened: scenes, untrained and trained COCOeval, the predictions PNG."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from attnzoo.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools on numpy 2

AP_LINE = r"  {name} +bbox AP (\d\.\d{{3}}) \(AP50 (\d\.\d{{3}})\)   segm AP (\d\.\d{{3}}) \(AP50 (\d\.\d{{3}})\)"


def test_demo_detection_runs_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the demo config writes under runs/demo_detection/
    args = ["--train-scenes", "8", "--test-scenes", "3", "--trainer.max_steps", "2"]
    assert main(["demo", "detection", *args, "--trainer.enable_progress_bar", "false"]) == 0
    out = capsys.readouterr().out
    assert "detection demo: mask_rcnn on agent_pvt_tiny, 2 steps; COCOeval on 3 held-out scenes" in out
    values = {}
    for name in ("untrained", "trained"):
        match = re.search(AP_LINE.format(name=name), out)
        assert match, out
        values[name] = [float(v) for v in match.groups()]
        assert all(0.0 <= v <= 1.0 for v in values[name])
    scenes = tmp_path / "runs" / "demo_detection" / "scenes"
    train = json.loads((scenes / "annotations" / "instances_train.json").read_text())
    test = json.loads((scenes / "annotations" / "instances_test.json").read_text())
    assert len(train["images"]) == 8 and len(test["images"]) == 3
    assert [c["name"] for c in test["categories"]] == [str(d) for d in range(10)]
    png = tmp_path / "runs" / "demo_detection" / "test_predictions.png"
    assert "predictions drawn in runs/demo_detection/test_predictions.png" in out
    with Image.open(png) as picture:  # a 3 x 1 grid of 128 px scenes drawn 3x larger, with 4 px padding
        assert picture.size == (3 * 384 + 4 * 4, 384 + 2 * 4)
    results = json.loads((tmp_path / "runs" / "demo_detection" / "detections" / "test_detections.json").read_text())
    assert {r["image_id"] for r in results} <= {im["id"] for im in test["images"]}


def test_demo_detection_checks_its_scene_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"data.val_images must be runs/demo_detection/scenes/test"):
        main(["demo", "detection", "--data.val_images", "elsewhere"])


@pytest.mark.parametrize("flag", ["--train-scenes", "--test-scenes"])
def test_demo_detection_checks_the_scene_counts_before_writing(tmp_path, monkeypatch, flag):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=f"{flag} must be a positive number of scenes, got -1"):
        main(["demo", "detection", flag, "-1"])
    assert not (tmp_path / "runs").exists()
