"""Detection callbacks: the ``attnzoo detect predict`` writer (COCO results JSON, rendered PNGs) and the summary."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from pycocotools import mask as mask_utils
from torchvision.io import encode_png
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from ..callbacks import TrainingSummary
from ..checkpoint_io import atomic_write

__all__ = ["DetectionSummary", "DetectionWriter", "render_detections", "render_names"]

_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180)]


def render_detections(
    image: torch.Tensor, results: list[dict[str, Any]], names: dict[int, str], score_threshold: float = 0.5
) -> torch.Tensor:
    """``image`` ``(3, H, W)`` float in [0, 1] with the COCO ``results`` of score >= ``score_threshold`` drawn:
    masks (from their RLE), boxes and ``"name score"`` labels; returns ``(3, H, W)`` uint8."""
    canvas = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    shown = [r for r in results if r["score"] >= score_threshold]
    if not shown:
        return canvas
    colors = [_PALETTE[r["category_id"] % len(_PALETTE)] for r in shown]
    if all("segmentation" in r for r in shown):
        rles = [{"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"].encode()} for r in shown]
        masks = torch.from_numpy(np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1))).bool()
        canvas = draw_segmentation_masks(canvas, masks, alpha=0.45, colors=colors)
    boxes = torch.tensor([r["bbox"] for r in shown], dtype=torch.float32)
    boxes[:, 2:] += boxes[:, :2]
    labels = [f"{names.get(r['category_id'], r['category_id'])} {r['score']:.2f}" for r in shown]
    return draw_bounding_boxes(canvas, boxes, labels=labels, colors=colors, width=2)


def render_names(files: dict[int, str]) -> dict[int, str]:
    """The PNG (a path relative to the render folder) of every image id of ``files`` (image id -> ``file_name``): the
    image's own relative path with its suffix replaced by ``.png`` (``sub/a.jpg`` -> ``sub/a.png``); images whose
    PNGs would then collide keep their suffix (``a.jpg`` -> ``a.jpg.png``, ``a.png`` -> ``a.png.png``), and
    ``..`` / absolute parts are dropped, so every image gets its own PNG inside the render folder."""

    def relative(name: str) -> PurePosixPath:
        parts = [p for p in PurePosixPath(str(name).replace("\\", "/")).parts if p not in ("/", "..", ".")]
        return PurePosixPath(*parts) if parts else PurePosixPath("image")

    short = {i: relative(name).with_suffix(".png").as_posix() for i, name in files.items()}
    counts = Counter(short.values())
    names = {i: n if counts[n] == 1 else f"{relative(files[i]).as_posix()}.png" for i, n in short.items()}
    counts = Counter(names.values())
    return {i: n if counts[n] == 1 else f"{n[: -len('.png')]}.id{i}.png" for i, n in names.items()}


class DetectionWriter(BasePredictionWriter):
    """``attnzoo detect predict`` output: the COCO results JSON of all ranks in ``<dirpath>/detections.json``
    (default ``<trainer.default_root_dir>``), every detection with its image's ``file_name`` next to the
    ``image_id``, and, with ``render`` (``--render DIR``), one PNG per image with the detections of score >=
    ``score_threshold`` drawn, named after the image file (see :func:`render_names`). Files are written atomically
    and never through a link planted at their name."""

    def __init__(self, dirpath: str | None = None, render: str | None = None, score_threshold: float = 0.5) -> None:
        super().__init__(write_interval="batch")
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
        self.dirpath, self.render, self.score_threshold = dirpath, render, score_threshold
        self.results: list[dict[str, Any]] = []
        self.results_path: Path | None = None
        self._files: dict[int, str] = {}
        self._pngs: dict[int, str] = {}

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.results = []
        dataset = getattr(trainer.datamodule, "datasets", {}).get("predict")
        images = dataset.base.coco.imgs if dataset is not None else {}
        self._files = {int(i): str(image["file_name"]) for i, image in images.items()}
        self._pngs = render_names(self._files)
        if self.render:
            Path(self.render).mkdir(parents=True, exist_ok=True)

    def _with_file_name(self, result: dict[str, Any]) -> dict[str, Any]:
        file_name = self._files.get(result["image_id"])
        return result if file_name is None else {**result, "file_name": file_name}

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        results = [self._with_file_name(r) for r in prediction["results"]]
        self.results.extend(results)
        if not self.render:
            return
        names = {c["id"]: c["name"] for c in getattr(pl_module, "categories", [])}
        real = batch[2] if len(batch) > 2 else [True] * len(batch[0])
        for image, target, is_real in zip(batch[0], batch[1], real):
            if not bool(is_real):
                continue
            image_id = int(target["image_id"])
            shown = [r for r in results if r["image_id"] == image_id]
            picture = render_detections(image, shown, names, self.score_threshold)
            png = Path(self.render) / self._pngs.get(image_id, f"image_{image_id}.png")
            atomic_write(png, encode_png(picture).numpy().tobytes())

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        results = self.results
        if trainer.world_size > 1 and dist.is_initialized():
            gathered: list | None = [None] * trainer.world_size if trainer.is_global_zero else None
            dist.gather_object(results, gathered, dst=0)
            results = [r for part in gathered or [] for r in part]
        if trainer.is_global_zero:
            path = atomic_write(Path(self.dirpath or trainer.default_root_dir) / "detections.json", json.dumps(results))
            self.results_path = path
            print(f"wrote {len(results)} detections to {path}" + (f", images to {self.render}" if self.render else ""))


class DetectionSummary(TrainingSummary):
    """The recipe's end-of-``fit`` summary with COCO AP (box and mask) instead of top-1."""

    KEYS = ("val/bbox_AP", "val/bbox_AP50", "val/segm_AP", "val/segm_AP50")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._checkpoints = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
        super().on_fit_end(trainer, pl_module)

    def _last_checkpoint(self) -> str | None:
        """``last.ckpt``: the CLI's ``last_checkpoint`` callback keeps it as its only (monitor-free) top-1 file."""
        for cb in getattr(self, "_checkpoints", []):
            path = cb.last_model_path or (cb.best_model_path if cb.filename == "last" else "")
            if path:
                return path
        return None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for key in self.KEYS:
            if key in trainer.callback_metrics:
                self._best[key] = max(self._best.get(key, -1.0), float(trainer.callback_metrics[key]))

    @rank_zero_only
    def _print(self) -> None:
        s = self.summary
        lines = [f"training summary: {s['model']}, {s['steps']} steps, {s['epochs']} epochs in {s['seconds']:.0f} s"]
        if s["images_per_second"]:
            lines[0] += f" ({s['images_per_second']:.1f} img/s)"
        for key in (*self.KEYS, "train/loss_epoch"):
            if key in s["metrics"]:
                best = f" (best {s['best'][key]:.4f})" if key in s["best"] else ""
                lines.append(f"  {key}: {s['metrics'][key]:.4f}{best}")
        last = s["last_checkpoint"] or self._last_checkpoint()
        if last:
            lines.append(f"  last checkpoint: {last}")
        if s["log_dir"]:
            lines.append(f"  logs: {s['log_dir']}")
        print("\n".join(lines), flush=True)
