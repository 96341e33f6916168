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

import sys
import warnings
from collections.abc import Sequence

from lightning.pytorch.cli import LightningArgumentParser

from ..callbacks import TrainingSummary
from ..cli import ZooCLI, _destroy_process_group, _resolve_config_args, _trainer_defaults
from .data import CocoDataModule
from .module import ObjectDetector
from .writer import DetectionSummary, DetectionWriter

__all__ = ["DetectionCLI", "main", "run_cli"]


class DetectionCLI(ZooCLI):
    """The recipe CLI with detection's checkpoint monitor and prediction writer (no timm weight export)."""

    monitor = "val/bbox_AP"

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        self.add_checkpoint_arguments(parser)
        parser.add_lightning_class_args(DetectionWriter, "predictions")

    def before_predict(self) -> None:
        """Refuse to predict with random detection heads (the backbone alone may be pretrained)."""
        config = self.config[self.subcommand]
        if not config.get("ckpt_path") and not config.get("model", {}).get("weights"):
            raise ValueError(
                "attnzoo detect predict needs --ckpt_path (last, or a .ckpt file of attnzoo detect fit) or "
                "--model.weights (a folder written by attnzoo convert --config): without either the detection heads "
                "are randomly initialised and the detections meaningless"
            )


def _detection_trainer_defaults() -> dict:
    defaults = _trainer_defaults()
    callbacks = [cb for cb in defaults["callbacks"] if type(cb) is not TrainingSummary]
    return {**defaults, "callbacks": [*callbacks, DetectionSummary()]}


def _render_alias(args: list[str]) -> list[str]:
    """``--render DIR`` / ``--render=DIR`` -> ``--predictions.render DIR``."""
    out = []
    for arg in args:
        if arg == "--render":
            arg = "--predictions.render"
        elif arg.startswith("--render="):
            arg = "--predictions.render=" + arg[len("--render=") :]
        out.append(arg)
    return out


def run_cli(args: Sequence[str] | None = None, run: bool = True, prog: str = "attnzoo detect") -> DetectionCLI:
    """Parse ``args`` (``["fit", "--config", ...]``; ``None``: ``sys.argv`` after the ``detect`` word) and run it;
    returns the CLI (``cli.trainer``, ``cli.model``, ``cli.datamodule``)."""
    if args is None:
        # DDP ranks re-run sys.argv (``attnzoo detect fit ...``), so the config names are resolved in it in place
        start = 2 if sys.argv[1:2] == ["detect"] else 1
        sys.argv[start:] = _resolve_config_args(_render_alias(sys.argv[start:]))
        args = sys.argv[start:]
    else:
        args = _resolve_config_args(_render_alias(list(args)))
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
    return DetectionCLI(
        ObjectDetector,
        CocoDataModule,
        args=args,
        run=run,
        seed_everything_default=0,
        trainer_defaults=_detection_trainer_defaults(),
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_kwargs={"prog": prog},
    )


def main(argv: Sequence[str] | None = None) -> None:
    """``attnzoo detect ...``: ``argv`` without the ``detect`` word (``None``: the command line)."""
    try:
        run_cli(argv)
    finally:
        _destroy_process_group()


if __name__ == "__main__":
    main()
