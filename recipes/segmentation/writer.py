"""Segmentation callbacks: the ``attnzoo segment predict`` writer (index PNGs, rendered overlays) and the summary."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image, ImageDraw

from ..detection.writer import DetectionSummary
from .classes import palette

__all__ = ["SegmentationSummary", "SegmentationWriter", "render_segmentation", "write_index_png"]


def write_index_png(pred: torch.Tensor, path: str | Path) -> Path:
    """Write a class map ``(H, W)`` as an index PNG: 8-bit (mode ``L``) for classes < 256, else 16-bit."""
    array = pred.cpu().numpy()
    image = (
        Image.fromarray(array.astype(np.uint8), "L")
        if array.max(initial=0) < 256
        else Image.fromarray(array.astype(np.uint16))
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def render_segmentation(
    image: torch.Tensor, pred: torch.Tensor, class_names: Sequence[str], alpha: float = 0.5
) -> Image.Image:
    """``image`` ``(3, H, W)`` float in [0, 1] with the class map ``pred`` ``(H, W)`` blended in a palette (weight
    ``alpha``), and a legend of the classes present (colour swatch + name) to its right."""
    colours = torch.tensor(palette(len(class_names)), dtype=torch.float32) / 255  # (K, 3)
    overlay = colours[pred.cpu().long()].permute(2, 0, 1)  # (3, H, W)
    blended = (1 - alpha) * image.cpu().float().clamp(0, 1) + alpha * overlay
    picture = Image.fromarray((blended * 255).round().byte().permute(1, 2, 0).numpy())
    present = torch.unique(pred.cpu()).tolist()
    line = 14
    width = 20 + 7 * max((len(str(class_names[c])) for c in present), default=0) + 10
    canvas = Image.new("RGB", (picture.width + width, max(picture.height, line * len(present) + 8)), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row, c in enumerate(present):
        x, y = picture.width + 4, 4 + row * line
        draw.rectangle([x, y, x + 10, y + 10], fill=tuple(int(v * 255) for v in colours[c].tolist()), outline="black")
        draw.text((x + 16, y - 1), str(class_names[c]), fill="black")
    return canvas


class SegmentationWriter(BasePredictionWriter):
    """``attnzoo segment predict`` output: one index PNG per image in ``dirpath`` (default
    ``<trainer.default_root_dir>/predictions``), named after the image file; with ``render`` (``--render DIR``)
    also the image with the classes overlaid and a legend."""

    def __init__(self, dirpath: str | None = None, render: str | None = None, alpha: float = 0.5) -> None:
        super().__init__(write_interval="batch")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.dirpath, self.render, self.alpha = dirpath, render, alpha
        self.written: list[Path] = []

    def _folder(self, trainer: pl.Trainer) -> Path:
        return Path(self.dirpath or Path(trainer.default_root_dir) / "predictions")

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.written = []
        self._folder(trainer).mkdir(parents=True, exist_ok=True)
        if self.render:
            Path(self.render).mkdir(parents=True, exist_ok=True)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        dataset = trainer.datamodule.datasets["predict"]
        names = dataset.names()
        images = {int(t["index"]): image for image, t in zip(batch[0], batch[1])}
        class_names = getattr(pl_module, "class_names", None) or [str(c) for c in range(pl_module.hparams.num_classes)]
        for index, pred in zip(prediction["indices"], prediction["preds"]):
            self.written.append(write_index_png(pred, self._folder(trainer) / f"{names[index]}.png"))
            if self.render:
                render_segmentation(images[index], pred, class_names, self.alpha).save(
                    Path(self.render) / f"{names[index]}.png"
                )

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        count = trainer.strategy.reduce(torch.tensor(len(self.written), device=pl_module.device), reduce_op="sum")
        if trainer.is_global_zero:
            rendered = f", overlays to {self.render}" if self.render else ""
            print(f"wrote {int(count)} index PNGs to {self._folder(trainer)}{rendered}", flush=True)


class SegmentationSummary(DetectionSummary):
    """The recipe's end-of-``fit`` summary with mIoU / mAcc / aAcc."""

    KEYS = ("val/mIoU", "val/mAcc", "val/aAcc")
