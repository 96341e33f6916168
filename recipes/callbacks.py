"""Callbacks of the classification recipe: progress bar with img/s and ETA, final summary, weight export, and the
clean-up of temporary files that a killed run left beside its checkpoints."""

from __future__ import annotations

import csv
import io
import math
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, LearningRateMonitor, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_only

from .checkpoint_io import atomic_write, remove_stale_temp_files
from .datasets import dataset_file_names
from .export import CONFIG_NAME, WEIGHTS_NAME, export_for_timm

__all__ = [
    "ExportWeights",
    "LoggedLearningRate",
    "PredictionWriter",
    "RemoveStaleTempFiles",
    "ThroughputProgressBar",
    "TrainingSummary",
]


def _format_seconds(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


class LoggedLearningRate(LearningRateMonitor):
    """Lightning's ``LearningRateMonitor``, idle in a run without a logger (``--trainer.logger false``), where the
    original stops training with a configuration error."""

    def on_train_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)


class ThroughputProgressBar(TQDMProgressBar):
    """tqdm bar whose postfix adds the global training throughput (``img/s``, all devices, smoothed) and the ETA of
    the whole run (``eta``), next to the logged metrics. Validation time is left out of the rate."""

    def __init__(self, refresh_rate: int = 1, smoothing: float = 0.9) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.smoothing = smoothing
        self._last_time: float | None = None
        self._step_seconds: float | None = None
        self._images_per_batch = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._last_time = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._last_time = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._last_time is not None:
            seconds = now - self._last_time
            s = self.smoothing
            self._step_seconds = seconds if self._step_seconds is None else s * self._step_seconds + (1 - s) * seconds
        self._last_time = now
        self._images_per_batch = len(batch[0]) * trainer.world_size
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, int | str | float]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        if self._step_seconds and trainer.training:
            items["img/s"] = f"{self._images_per_batch / self._step_seconds:.0f}"
            total = trainer.estimated_stepping_batches
            if math.isfinite(total):
                remaining = (total - trainer.global_step) * trainer.accumulate_grad_batches * self._step_seconds
                items["eta"] = _format_seconds(remaining)
        return items


class TrainingSummary(Callback):
    """Prints one summary at the end of ``fit`` (rank 0): steps, epochs, time, img/s, the last and best validation
    top-1 of the raw and EMA weights and the latest checkpoint written; :attr:`summary` keeps the numbers."""

    def __init__(self) -> None:
        self.summary: dict[str, Any] = {}
        self._start = 0.0
        self._start_step = 0
        self._best: dict[str, float] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._start_step, self._best = time.perf_counter(), trainer.global_step, {}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for key in ("val/top1", "val_ema/top1"):
            if key in trainer.callback_metrics:
                self._best[key] = max(self._best.get(key, 0.0), float(trainer.callback_metrics[key]))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seconds = time.perf_counter() - self._start
        steps = trainer.global_step - self._start_step
        batch_size = getattr(trainer.datamodule, "batch_size", None)
        images = steps * trainer.accumulate_grad_batches * trainer.world_size * (batch_size or 0)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val", "train/loss"))}
        saved = [Path(p) for cb in trainer.checkpoint_callbacks for p in (cb.last_model_path, cb.best_model_path) if p]
        saved = [p for p in saved if p.is_file()]
        self.summary = {
            "model": getattr(pl_module.hparams, "model_name", type(pl_module).__name__),
            "epochs": trainer.current_epoch,
            "steps": trainer.global_step,
            "seconds": seconds,
            "images_per_second": images / seconds if seconds > 0 and images else None,
            "metrics": metrics,
            "best": dict(self._best),
            "last_checkpoint": str(max(saved, key=lambda p: p.stat().st_mtime_ns)) if saved else None,
            "log_dir": trainer.log_dir,
        }
        self._print()

    @rank_zero_only
    def _print(self) -> None:
        s = self.summary
        lines = [f"training summary: {s['model']}, {s['steps']} steps, {s['epochs']} epochs in {s['seconds']:.0f} s"]
        if s["images_per_second"]:
            lines[0] += f" ({s['images_per_second']:.0f} img/s)"
        for key in ("val/top1", "val/top5", "val_ema/top1", "val_ema/top5", "val/loss"):
            if key in s["metrics"]:
                best = f" (best {s['best'][key]:.4f})" if key in s["best"] else ""
                lines.append(f"  {key}: {s['metrics'][key]:.4f}{best}")
        if s["last_checkpoint"]:
            lines.append(f"  last checkpoint: {s['last_checkpoint']}")
        if s["log_dir"]:
            lines.append(f"  logs: {s['log_dir']}")
        print("\n".join(lines), flush=True)


class ExportWeights(Callback):
    """At the end of ``fit``, writes the EMA weights (when the module keeps an EMA and ``weights`` is ``"auto"`` or
    ``"ema"``) or the raw weights as a timm-loadable ``model.safetensors`` + ``config.json`` into ``dirpath``
    (default ``<trainer.default_root_dir>/export``), with the data module's ``class_names`` as ``label_names``.
    :attr:`weights_path` holds the file written.

    A ``fit`` whose export folder already holds an export stops at start-up with a ``FileExistsError`` unless
    ``overwrite`` is true (``--export.overwrite true``), so an earlier run's weights are never replaced unnoticed.
    """

    def __init__(self, dirpath: str | None = None, weights: str = "auto", overwrite: bool = False) -> None:
        if weights not in ("auto", "ema", "raw"):
            raise ValueError(f"weights must be 'auto', 'ema' or 'raw', got {weights!r}")
        self.dirpath, self.weights, self.overwrite = dirpath, weights, overwrite
        self.weights_path: Path | None = None

    def _directory(self, trainer: pl.Trainer) -> Path:
        return Path(self.dirpath or Path(trainer.default_root_dir) / "export")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        directory = self._directory(trainer)
        found = (
            [n for n in (WEIGHTS_NAME, CONFIG_NAME) if os.path.lexists(directory / n)] if trainer.is_global_zero else []
        )
        found = trainer.strategy.broadcast(found, src=0)
        if found and not self.overwrite:
            raise FileExistsError(
                f"the export folder {directory} already holds {' and '.join(found)} from an earlier run; pass "
                "--export.overwrite true (export: {overwrite: true}) to replace it at the end of this run, or "
                "choose another folder with --export.dirpath"
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ema = getattr(pl_module, "ema", None)
        if self.weights == "ema" and ema is None:
            raise ValueError("ExportWeights(weights='ema') needs model.ema_decay to be set")
        model = ema.module if ema is not None and self.weights != "raw" else pl_module.model
        data_config_fn = getattr(trainer.datamodule, "data_config", None)
        label_names = getattr(trainer.datamodule, "class_names", None)
        directory = self._directory(trainer)
        if trainer.is_global_zero:
            self.weights_path = export_for_timm(
                model,
                directory,
                data_config=data_config_fn() if data_config_fn else None,
                label_names=label_names if label_names is not None and len(label_names) == model.num_classes else None,
            )
            print(f"exported {'EMA' if model is not pl_module.model else 'raw'} weights to {self.weights_path}")
        else:
            self.weights_path = directory / WEIGHTS_NAME
        trainer.strategy.barrier("export_weights")


class RemoveStaleTempFiles(Callback):
    """At the start of ``fit`` (rank 0), deletes the hidden temporary files (``.last.ckpt.<random>.tmp``) that a run
    killed while writing a checkpoint left in the checkpoint folders; :attr:`removed` lists them."""

    def __init__(self) -> None:
        self.removed: list[Path] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        folders = {cb.dirpath for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)}
        self.removed = [p for folder in sorted(folders) for p in remove_stale_temp_files(folder)]
        if self.removed:
            print(f"removed {len(self.removed)} temporary file(s) of an interrupted checkpoint write: {self.removed}")


class PredictionWriter(BasePredictionWriter):
    """``attnzoo predict`` output: one CSV row per real (non-padding) image with its dataset index, its file (the
    path inside the split folder; empty for datasets without files, such as the embedded digits), target (when
    known) and top-k classes and probabilities, in ``<dirpath>/predictions_rank<r>.csv``, written at the end of the
    run (atomically; a link at that path is replaced, not followed)."""

    HEADER = ("index", "file", "target", "classes", "probabilities")

    def __init__(self, dirpath: str | None = None, top_k: int = 5) -> None:
        super().__init__(write_interval="batch")
        self.dirpath, self.top_k = dirpath, top_k
        self._rows: list[tuple] = []
        self._files: list[str] | None = None

    def _path(self, trainer: pl.Trainer) -> Path:
        return Path(self.dirpath or trainer.default_root_dir) / f"predictions_rank{trainer.global_rank}.csv"

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rows = []
        dataset = getattr(trainer.datamodule, "datasets", {}).get("predict")
        self._files = dataset_file_names(dataset) if dataset is not None else None

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        probs = prediction["probs"].float().cpu()
        top = probs.topk(min(self.top_k, probs.shape[-1]), dim=-1)
        real = prediction.get("is_real")
        target = prediction.get("target")
        for i, index in enumerate(batch_indices or [None] * len(probs)):  # no indices: neither index nor file
            if real is not None and not bool(real[i]):
                continue
            file = self._files[index] if self._files is not None and index is not None else ""
            classes = " ".join(str(c) for c in top.indices[i].tolist())
            values = " ".join(f"{v:.4f}" for v in top.values[i].tolist())
            label = int(target[i]) if target is not None else ""
            self._rows.append(("" if index is None else index, file, label, classes, values))

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(self.HEADER)
        writer.writerows(self._rows)
        atomic_write(self._path(trainer), text.getvalue())
