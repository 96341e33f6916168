"""``attnzoo detect fit|validate|test|predict --config recipes/configs/coco/<name>.yaml`` (LightningCLI).

Sections: ``model`` (:class:`~attnzoo.recipes.detection.module.ObjectDetector`), ``data``
(:class:`~attnzoo.recipes.detection.data.CocoDataModule`), ``trainer``, ``checkpoint`` (``ModelCheckpoint``: the
best ``val/bbox_AP`` kept), ``last_checkpoint`` (``last.ckpt`` rewritten every epoch, same folder) and
``predictions`` (:class:`DetectionWriter`: COCO results JSON, ``--render DIR`` for PNGs). The conventions of the
classification CLI apply: shipped config names resolve from any folder, ``use_distributed_sampler: false``, atomic
checkpoints, the img/s + ETA progress bar, a learning-rate monitor, a final summary (with AP), and
``--ckpt_path last`` resumes a crashed run. ``predict`` needs ``--ckpt_path`` or converted ``--model.weights``:
without either the detection heads are random.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..task_cli import TaskCLI, run_task_cli, task_main
from .data import CocoDataModule
from .module import ObjectDetector
from .writer import DetectionSummary, DetectionWriter

__all__ = ["DetectionCLI", "main", "run_cli"]


class DetectionCLI(TaskCLI):
    """The recipe CLI with detection's checkpoint monitor, prediction writer and summary (no timm weight export)."""

    command = "detect"
    monitor = "val/bbox_AP"
    writer = DetectionWriter
    summary = DetectionSummary
    outputs = "detections"


def run_cli(args: Sequence[str] | None = None, run: bool = True, prog: str = "attnzoo detect") -> DetectionCLI:
    """Parse ``args`` (``["fit", "--config", ...]``; ``None``: ``sys.argv`` after the ``detect`` word) and run it;
    returns the CLI (``cli.trainer``, ``cli.model``, ``cli.datamodule``)."""
    return run_task_cli(DetectionCLI, ObjectDetector, CocoDataModule, args, run, prog)


def main(argv: Sequence[str] | None = None) -> None:
    """``attnzoo detect ...``: ``argv`` without the ``detect`` word (``None``: the command line)."""
    task_main(run_cli, argv)


if __name__ == "__main__":
    main()
