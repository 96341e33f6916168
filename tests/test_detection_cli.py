"""`attnzoo detect`: fit, validate and predict (COCO results JSON + rendered PNGs) through the console entry point."""

import json
import textwrap

import pytest
import torch
from detection_fixtures import write_shapes_coco
from PIL import Image
from pycocotools.coco import COCO

from attnzoo.cli import build_parser
from attnzoo.cli import main as attnzoo_main

CONFIG = """
seed_everything: 0
model:
  arch: mask_rcnn
  backbone: biformer_tiny
  num_classes: 2
  backbone_kwargs: {depths: [1, 1, 1, 1], dims: [32, 64, 128, 256]}
  fpn_channels: 32
  min_size: 128
  max_size: 160
  detector_kwargs: {box_batch_size_per_image: 64, rpn_batch_size_per_image: 64, rpn_post_nms_top_n_test: 100}
  lr: 1.0e-3
  schedule: null
  epochs: 2
  milestones: [2]
  warmup_steps: 2
data:
  train_ann: %(ann)s
  train_images: %(images)s
  val_ann: %(ann)s
  val_images: %(images)s
  num_workers: 0
  train_scales: [96, 128]
  train_max_size: 160
trainer:
  accelerator: cpu
  max_epochs: 2
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  logger: {class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: %(out)s, name: csv}}
  default_root_dir: %(out)s
checkpoint: {dirpath: %(out)s/checkpoints}
predictions: {dirpath: %(out)s/predict}
"""


def test_detect_fit_validate_predict_render(tmp_path, capsys):
    ann, images = write_shapes_coco(tmp_path, 4)
    out = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent(CONFIG % {"ann": ann, "images": images, "out": out}))
    assert attnzoo_main(["detect", "fit", "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "training summary" in printed and "val/bbox_AP" in printed and "last.ckpt" in printed
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    # 3 landscape/square + 1 portrait image in batches of 2: 3 steps per epoch; last.ckpt is from the last epoch
    assert last["epoch"] == 1 and last["global_step"] == 6
    assert last["categories"] == [{"id": 3, "name": "square"}, {"id": 7, "name": "disk"}]

    assert attnzoo_main(["detect", "validate", "--config", str(config), "--ckpt_path", "last"]) == 0
    assert "val/segm_AP" in capsys.readouterr().out

    render = tmp_path / "render"
    args = ["--ckpt_path", "last", "--render", str(render), "--predictions.score_threshold", "0.0"]
    assert attnzoo_main(["detect", "predict", "--config", str(config), *args]) == 0
    detections = json.loads((out / "predict" / "detections.json").read_text())
    assert detections and {d["image_id"] for d in detections} <= {100, 101, 102, 103}
    COCO(str(ann)).loadRes(detections)  # a valid COCO results file for the ground truth
    pngs = sorted(render.glob("*.png"))
    assert [p.name for p in pngs] == ["000.png", "001.png", "002.png", "003.png"]
    for png in pngs:
        with Image.open(png) as drawn, Image.open(images / png.name) as original:
            assert drawn.size == original.size
            assert drawn.convert("RGB").tobytes() != original.convert("RGB").tobytes()  # something was drawn


def test_detect_is_listed_in_the_help():
    assert "detect" in build_parser().format_help()


def test_predict_without_a_checkpoint_is_refused(tmp_path, one_thread):
    ann, images = write_shapes_coco(tmp_path, 1)
    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent(CONFIG % {"ann": ann, "images": images, "out": tmp_path / "run"}))
    with pytest.raises(ValueError, match=r"detect predict needs --ckpt_path .* randomly initialised"):
        attnzoo_main(["detect", "predict", "--config", str(config)])
    assert not (tmp_path / "run" / "predict").exists()
