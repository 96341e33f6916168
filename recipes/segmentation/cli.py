"""``attnzoo segment fit|validate|test|predict --config recipes/configs/ade20k/<name>.yaml`` (LightningCLI).

Sections: ``model`` (:class:`~attnzoo.recipes.segmentation.module.SemanticSegmenter`), ``data``
(:class:`~attnzoo.recipes.segmentation.data.SegmentationDataModule`), ``trainer``, ``checkpoint`` (``ModelCheckpoint``:
the best ``val/mIoU`` kept), ``last_checkpoint`` (``last.ckpt``, same folder) and ``predictions``
(:class:`SegmentationWriter`: index PNGs, ``--render DIR`` for overlays). The conventions of the other recipes apply:
shipped config names resolve from any folder, ``use_distributed_sampler: false``, atomic checkpoints, the img/s +
ETA progress bar, a learning-rate monitor, a final summary (with mIoU), and ``--ckpt_path last`` resumes a crashed
run as if it had not stopped. ``predict`` needs ``--ckpt_path`` or converted ``--model.weights``:
without either the decode heads are random.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..task_cli import TaskCLI, run_task_cli, task_main
from .data import SegmentationDataModule
from .module import SemanticSegmenter
from .writer import SegmentationSummary, SegmentationWriter

__all__ = ["SegmentationCLI", "main", "run_cli"]


class SegmentationCLI(TaskCLI):
    """The recipe CLI with segmentation's checkpoint monitor, prediction writer and summary (no timm weight export)."""

    command = "segment"
    monitor = "val/mIoU"
    writer = SegmentationWriter
    summary = SegmentationSummary
    outputs = "masks"


def run_cli(args: Sequence[str] | None = None, run: bool = True, prog: str = "attnzoo segment") -> SegmentationCLI:
    """Parse ``args`` (``["fit", "--config", ...]``; ``None``: ``sys.argv`` after the ``segment`` word) and run it;
    returns the CLI (``cli.trainer``, ``cli.model``, ``cli.datamodule``)."""
    return run_task_cli(SegmentationCLI, SemanticSegmenter, SegmentationDataModule, args, run, prog)


def main(argv: Sequence[str] | None = None) -> None:
    """``attnzoo segment ...``: ``argv`` without the ``segment`` word (``None``: the command line)."""
    task_main(run_cli, argv)


if __name__ == "__main__":
    main()
