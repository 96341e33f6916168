"""``attnzoo demo segmentation``: UperNet on a small zoo backbone, trained on CPU on scenes of real MNIST digits.

Writes segmentation scenes composed by the detection demo's generator (:mod:`..detection.digit_scenes`: training
scenes from the 4,000 training digits, test scenes from the 1,000 held-out ones) as image PNGs + index-mask PNGs
(pixel class = 1 + the digit of its stroke, background 0), evaluates the untrained model on the test scenes, trains
it with the segmentation recipe (``attnzoo segment``'s CLI, config
``recipes/configs/demo/segmentation/upernet_digits.yaml``), evaluates it again (dataset-level mIoU and per-class
IoU) and draws image | ground truth | prediction of the first test scenes into one PNG. Options of the config can be
overridden on the command line (``attnzoo demo segmentation --trainer.max_steps 100``); ``--train-scenes N`` and
``--test-scenes N`` set how many scenes are written.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..cli import CONFIG_DIR
from ..detection.digit_scenes import DigitScenes, compose_scene
from .classes import palette
from .cli import run_cli

__all__ = ["DEMO_CONFIG", "CLASS_NAMES", "render_test_predictions", "run_segmentation_demo", "write_digit_masks"]

DEMO_CONFIG = CONFIG_DIR / "demo" / "segmentation" / "upernet_digits.yaml"
CLASS_NAMES = ["background", *(f"digit {d}" for d in range(10))]
TRAIN_SCENES, TEST_SCENES = 1200, 100
SCENE_OPTIONS = dict(canvas_size=128, digits_per_scene=(2, 4), digit_size=(24, 56))


def write_digit_masks(
    root: str | os.PathLike,
    split: str,
    num_scenes: int,
    *,
    canvas_size: int = 128,
    digits_per_scene: tuple[int, int] = (2, 4),
    digit_size: tuple[int, int] = (24, 56),
    seed: int = 0,
) -> Path:
    """Write ``num_scenes`` digit scenes of ``split`` (``"train"`` / ``"test"``) as ``<root>/<split>/images/*.png``
    (RGB) and ``<root>/<split>/masks/*.png`` (mode ``L``: 0 background, ``1 + d`` the strokes of digit ``d``);
    returns ``<root>/<split>``."""
    if num_scenes < 1:
        raise ValueError(f"num_scenes must be >= 1, got {num_scenes}")
    scenes = DigitScenes(split, seed)
    folder = Path(root) / split
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    for k in range(num_scenes):
        image, masks, classes = compose_scene(scenes, canvas_size, digits_per_scene, digit_size)
        label = np.zeros(image.shape, dtype=np.uint8)
        for mask, digit in zip(masks, classes):
            label[mask] = digit + 1
        name = f"{split}_{k:05d}.png"
        Image.fromarray(image).convert("RGB").save(folder / "images" / name)
        Image.fromarray(label, "L").save(folder / "masks" / name)
    return folder


def _scene_root(datamodule) -> Path:
    """The scene folder named by the config (``<root>/train/{images,masks}``, ``<root>/test/{images,masks}``)."""
    hp = datamodule.hparams
    root = Path(hp.train_images).parent.parent
    expected = {
        "train_images": root / "train" / "images",
        "train_masks": root / "train" / "masks",
        "val_images": root / "test" / "images",
        "val_masks": root / "test" / "masks",
    }
    for key, path in expected.items():
        if hp[key] is None or Path(hp[key]) != path:
            raise ValueError(
                f"the segmentation demo writes its scenes under {root}: data.{key} must be {path}, got {hp[key]}"
            )
    return root


@torch.inference_mode()
def render_test_predictions(model, datamodule, out_png: str | Path, num_images: int = 4, upscale: int = 2) -> Path:
    """One PNG with a row per test scene: image | ground truth | prediction (classes in the palette, black for
    background and ignored pixels), enlarged ``upscale`` times."""
    dataset = datamodule.datasets["test"]
    colours = np.array([(0, 0, 0), *palette(len(CLASS_NAMES) - 1)], dtype=np.uint8)
    was_training = model.training
    model.eval()
    rows = []
    for index in range(min(num_images, len(dataset))):
        image, target = dataset[index]
        pred = model.predict_probs(image).argmax(0).numpy()
        truth = target["mask"].numpy()
        picture = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        gt = colours[np.where(truth < len(colours), truth, 0)]
        rows.append(
            np.concatenate(
                [picture, np.full_like(picture[:, :4], 255), gt, np.full_like(picture[:, :4], 255), colours[pred]], 1
            )
        )
        rows.append(np.full_like(rows[-1][:4], 255))
    model.train(was_training)
    grid = np.concatenate(rows[:-1], 0).repeat(upscale, 0).repeat(upscale, 1)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(out_png)
    return out_png


def _iou_table(untrained: dict, trained: dict) -> str:
    lines = [f"  {'class':<11} {'untrained':>9} {'trained':>9}"]
    for before, after in zip(untrained["per_class"], trained["per_class"]):
        cells = [f"{row['IoU']:.3f}" if row["IoU"] is not None else "-" for row in (before, after)]
        lines.append(f"  {before['class']:<11} {cells[0]:>9} {cells[1]:>9}")
    return "\n".join(lines)


def run_segmentation_demo(args: Sequence[str] = ()) -> dict:
    """Run the demo with LightningCLI-style ``args`` (the config defaults to :data:`DEMO_CONFIG`) plus
    ``--train-scenes`` / ``--test-scenes``; returns the untrained and trained test metrics and the PNG path."""
    parser = argparse.ArgumentParser(prog="attnzoo demo segmentation", add_help=False)
    parser.add_argument("--train-scenes", type=int, default=TRAIN_SCENES)
    parser.add_argument("--test-scenes", type=int, default=TEST_SCENES)
    own, rest = parser.parse_known_args(list(args))
    if "-h" in rest or "--help" in rest:
        print(
            f"attnzoo demo segmentation: --train-scenes N (default {TRAIN_SCENES}), --test-scenes N (default "
            f"{TEST_SCENES}) set how many digit scenes are written; the config's options follow.",
            flush=True,
        )
    if not any(a == "--config" or a.startswith("--config=") for a in rest):
        rest = ["--config", str(DEMO_CONFIG), *rest]
    cli = run_cli(rest, run=False, prog="attnzoo demo segmentation")
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    root = _scene_root(datamodule)
    if trainer.is_global_zero:
        write_digit_masks(root, "train", own.train_scenes, **SCENE_OPTIONS)
        write_digit_masks(root, "test", own.test_scenes, **SCENE_OPTIONS)
    trainer.strategy.barrier()
    trainer.test(model, datamodule=datamodule, verbose=False)
    untrained = model.last_metrics
    trainer.fit(model, datamodule=datamodule)
    trainer.test(model, datamodule=datamodule, verbose=False)
    trained = model.last_metrics
    png = Path(trainer.default_root_dir) / "test_predictions.png"
    if trainer.is_global_zero:
        render_test_predictions(model, datamodule, png)
        print(
            f"segmentation demo: {model.hparams.decoder} on {model.hparams.backbone}, {trainer.global_step} steps; "
            f"dataset-level metrics on {len(datamodule.datasets['test'])} held-out scenes ({root / 'test'}):\n"
            f"  untrained mIoU {untrained['mIoU']:.3f}  mAcc {untrained['mAcc']:.3f}  aAcc {untrained['aAcc']:.3f}\n"
            f"  trained   mIoU {trained['mIoU']:.3f}  mAcc {trained['mAcc']:.3f}  aAcc {trained['aAcc']:.3f}\n"
            f"per-class IoU:\n{_iou_table(untrained, trained)}\n"
            f"  image | ground truth | prediction drawn in {png}",
            flush=True,
        )
    return {"untrained": untrained, "trained": trained, "png": str(png), "scenes": str(root)}
