"""``attnzoo segment fit|validate|test|predict --config recipes/configs/ade20k/<name>.yaml`` (LightningCLI).

Sections: ``model`` (:class:`~attnzoo.recipes.segmentation.module.SemanticSegmenter`), ``data``
(:class:`~attnzoo.recipes.segmentation.data.SegmentationDataModule`), ``trainer``, ``checkpoint`` (``ModelCheckpoint``:
the best ``val/mIoU`` kept), ``last_checkpoint`` (``last.ckpt``, same folder) and ``predictions``
(:class:`SegmentationWriter`: index PNGs, ``--render DIR`` for overlays). The conventions of the other recipes apply:
shipped config names resolve from any folder, ``use_distributed_sampler: false``, atomic checkpoints, the img/s +
ETA progress bar, a learning-rate monitor, a final summary (with mIoU), and ``--ckpt_path last`` resumes a crashed
run as if it had not stopped.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence

from lightning.pytorch.cli import LightningArgumentParser

from ..callbacks import TrainingSummary
from ..cli import ZooCLI, _destroy_process_group, _resolve_config_args, _trainer_defaults
from ..detection.cli import _render_alias
from .data import SegmentationDataModule
from .module import SemanticSegmenter
from .writer import SegmentationSummary, SegmentationWriter

__all__ = ["SegmentationCLI", "main", "run_cli"]


class SegmentationCLI(ZooCLI):
    """The recipe CLI with segmentation's checkpoint monitor and prediction writer (no timm weight export)."""

    monitor = "val/mIoU"

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        self.add_checkpoint_arguments(parser)
        parser.add_lightning_class_args(SegmentationWriter, "predictions")


def _segmentation_trainer_defaults() -> dict:
    defaults = _trainer_defaults()
    callbacks = [cb for cb in defaults["callbacks"] if type(cb) is not TrainingSummary]
    return {**defaults, "callbacks": [*callbacks, SegmentationSummary()]}


def run_cli(args: Sequence[str] | None = None, run: bool = True, prog: str = "attnzoo segment") -> SegmentationCLI:
    """Parse ``args`` (``["fit", "--config", ...]``; ``None``: ``sys.argv`` after the ``segment`` word) and run it;
    returns the CLI (``cli.trainer``, ``cli.model``, ``cli.datamodule``)."""
    if args is None:
        # DDP ranks re-run sys.argv (``attnzoo segment fit ...``), so the config names are resolved in it in place
        start = 2 if sys.argv[1:2] == ["segment"] else 1
        sys.argv[start:] = _resolve_config_args(_render_alias(sys.argv[start:]))
        args = sys.argv[start:]
    else:
        args = _resolve_config_args(_render_alias(list(args)))
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
    return SegmentationCLI(
        SemanticSegmenter,
        SegmentationDataModule,
        args=args,
        run=run,
        seed_everything_default=0,
        trainer_defaults=_segmentation_trainer_defaults(),
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_kwargs={"prog": prog},
    )


def main(argv: Sequence[str] | None = None) -> None:
    """``attnzoo segment ...``: ``argv`` without the ``segment`` word (``None``: the command line)."""
    try:
        run_cli(argv)
    finally:
        _destroy_process_group()


if __name__ == "__main__":
    main()
