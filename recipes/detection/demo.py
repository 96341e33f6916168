"""``attnzoo demo detection``: Mask R-CNN on a small zoo backbone, trained on CPU on scenes of real MNIST digits.

Writes the digit scenes (:mod:`.digit_scenes`: training scenes from the 4,000 training digits, test scenes from the
1,000 held-out ones), evaluates the untrained detector on the test scenes, trains it with the detection recipe
(``attnzoo detect``'s CLI, config ``recipes/configs/demo/detection/mask_rcnn_digits.yaml``), evaluates it again with
pycocotools ``COCOeval`` (bbox and segm) and draws its predictions on the first test scenes into one PNG. Options of
the config can be overridden on the command line (``attnzoo demo detection --trainer.max_epochs 2``);
``--train-scenes N`` and ``--test-scenes N`` set how many scenes are written.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.utils import make_grid

from ..checkpoint_io import atomic_write
from ..cli import CONFIG_DIR
from .cli import run_cli
from .digit_scenes import write_digit_scenes
from .evaluation import detections_to_coco
from .writer import render_detections

__all__ = ["DEMO_CONFIG", "render_test_predictions", "run_detection_demo"]

DEMO_CONFIG = CONFIG_DIR / "demo" / "detection" / "mask_rcnn_digits.yaml"
TRAIN_SCENES, TEST_SCENES = 1200, 100
SCENE_OPTIONS = dict(canvas_size=128, digits_per_scene=(2, 4), digit_size=(24, 56))


def _scene_root(datamodule) -> Path:
    """The scene folder named by the config (``<root>/train``, ``<root>/test``, ``<root>/annotations``)."""
    hp = datamodule.hparams
    root = Path(hp.train_images).parent
    expected = {
        "train_ann": root / "annotations" / "instances_train.json",
        "train_images": root / "train",
        "val_ann": root / "annotations" / "instances_test.json",
        "val_images": root / "test",
    }
    for key, path in expected.items():
        if hp[key] is None or Path(hp[key]) != path:
            raise ValueError(
                f"the detection demo writes its scenes under {root}: data.{key} must be {path}, got {hp[key]}"
            )
    return root


@torch.inference_mode()
def render_test_predictions(
    model, datamodule, out_png: str | Path, num_images: int = 6, score: float = 0.5, upscale: int = 3
) -> Path:
    """Draw the detections of score >= ``score`` (boxes, labels, masks) of ``model`` (an
    :class:`~.module.ObjectDetector`) on the first ``num_images`` test images into one PNG grid ``out_png``. The
    model sees the images at their size; image, boxes and mask probabilities are enlarged ``upscale`` times for
    drawing, so that labels stay legible on small scenes."""
    dataset = datamodule.datasets["test"]
    names = {c["id"]: c["name"] for c in model.categories}
    was_training = model.training
    model.eval()
    pictures = []
    for index in range(min(num_images, len(dataset))):
        image, target = dataset[index]
        output = model([image])[0]
        output = {**output, "boxes": output["boxes"] * upscale}
        if "masks" in output:
            output["masks"] = F.interpolate(output["masks"], scale_factor=upscale, mode="bilinear")
        results = detections_to_coco(output, target["image_id"], model.category_ids)
        large = F.interpolate(image[None], scale_factor=upscale, mode="nearest")[0]
        pictures.append(render_detections(large, results, names, score))
    model.train(was_training)
    grid = make_grid(pictures, nrow=3, padding=4, pad_value=255)  # (3, H, W) uint8
    picture = Image.fromarray(grid.permute(1, 2, 0).numpy())
    return atomic_write(out_png, lambda f: picture.save(f, format="PNG"))


def _ap_line(name: str, metrics: dict) -> str:
    return (
        f"  {name:<9} bbox AP {metrics['test/bbox_AP']:.3f} (AP50 {metrics['test/bbox_AP50']:.3f})   "
        f"segm AP {metrics['test/segm_AP']:.3f} (AP50 {metrics['test/segm_AP50']:.3f})"
    )


def run_detection_demo(args: Sequence[str] = ()) -> dict:
    """Run the demo with LightningCLI-style ``args`` (the config defaults to :data:`DEMO_CONFIG`) plus
    ``--train-scenes`` / ``--test-scenes``; returns the untrained and trained test metrics and the PNG path."""
    parser = argparse.ArgumentParser(prog="attnzoo demo detection", add_help=False)
    parser.add_argument("--train-scenes", type=int, default=TRAIN_SCENES)
    parser.add_argument("--test-scenes", type=int, default=TEST_SCENES)
    own, rest = parser.parse_known_args(list(args))
    for flag, value in (("--train-scenes", own.train_scenes), ("--test-scenes", own.test_scenes)):
        if value < 1:
            raise ValueError(f"{flag} must be a positive number of scenes, got {value}")
    if "-h" in rest or "--help" in rest:
        print(
            f"attnzoo demo detection: --train-scenes N (default {TRAIN_SCENES}), --test-scenes N (default "
            f"{TEST_SCENES}) set how many digit scenes are written; the config's options follow.",
            flush=True,
        )
    if not any(a == "--config" or a.startswith("--config=") for a in rest):
        rest = ["--config", str(DEMO_CONFIG), *rest]
    cli = run_cli(rest, run=False, prog="attnzoo demo detection")
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    root = _scene_root(datamodule)
    single_class = model.hparams.num_classes == 1
    if trainer.is_global_zero:
        write_digit_scenes(root, "train", own.train_scenes, single_class=single_class, **SCENE_OPTIONS)
        write_digit_scenes(root, "test", own.test_scenes, single_class=single_class, **SCENE_OPTIONS)
    trainer.strategy.barrier()
    untrained = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    trainer.fit(model, datamodule=datamodule)
    trained = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    png = Path(trainer.default_root_dir) / "test_predictions.png"
    if trainer.is_global_zero:
        render_test_predictions(model, datamodule, png)
        print(
            f"detection demo: {model.hparams.arch} on {model.hparams.backbone}, {trainer.global_step} steps; "
            f"COCOeval on {len(datamodule.datasets['test'])} held-out scenes ({root / 'test'}):\n"
            f"{_ap_line('untrained', untrained)}\n{_ap_line('trained', trained)}\n"
            f"  predictions drawn in {png}",
            flush=True,
        )
    return {"untrained": untrained, "trained": trained, "png": str(png), "scenes": str(root)}
