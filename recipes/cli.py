"""LightningCLI entry point: ``attnzoo fit|validate|test|predict --config recipes/configs/...yaml``.

The parser has the sections ``model`` (:class:`~attnzoo.recipes.module.ImageClassifier`), ``data``
(:class:`~attnzoo.recipes.data.ImageDataModule`), ``trainer`` (Lightning's Trainer), ``checkpoint``
(``ModelCheckpoint``: best ``val/top1`` kept), ``last_checkpoint`` (``last.ckpt`` rewritten every epoch or every
``checkpoint.every_n_train_steps``, same folder), ``export`` (:class:`ExportWeights`) and
``predictions`` (:class:`PredictionWriter`, the CSV of ``attnzoo predict``). Defaults
added to every run: ``use_distributed_sampler: false`` (the data module builds rank-aware samplers), atomic
checkpoint writes (with the clean-up of the temporary files of a killed run at start-up), the img/s + ETA progress
bar, a learning-rate monitor and the final summary.

Resume after a crash with ``--ckpt_path last`` (``checkpoint.dirpath`` must be fixed, as in the shipped configs). The
``model.*`` values always come from the config and the command line, never from the checkpoint: a checkpoint of
another architecture is an error naming the differing keys (see ``ImageClassifier.on_load_checkpoint``).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from .callbacks import (
    ExportWeights,
    LoggedLearningRate,
    PredictionWriter,
    RemoveStaleTempFiles,
    ThroughputProgressBar,
    TrainingSummary,
)
from .data import ImageDataModule
from .module import ImageClassifier

__all__ = ["CONFIG_DIR", "ZooCLI", "resolve_config_path", "run_cli"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ZooCLI(LightningCLI):
    """LightningCLI with the recipe's checkpoint and export sections."""

    monitor = "val/top1"  # the metric whose best checkpoint is kept

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        self.add_checkpoint_arguments(parser)
        parser.add_lightning_class_args(ExportWeights, "export")
        parser.add_lightning_class_args(PredictionWriter, "predictions")

    def add_checkpoint_arguments(self, parser: LightningArgumentParser) -> None:
        """``checkpoint`` (the best ``monitor`` kept) and ``last_checkpoint`` (``last.ckpt``, same folder)."""
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.save_last": False,
                "checkpoint.monitor": self.monitor,
                "checkpoint.mode": "max",
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": "epoch{epoch:03d}-step{step:07d}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        # Lightning >= 2.6 refreshes a monitored checkpoint's ``save_last`` only when the monitored value improved, so
        # ``--ckpt_path last`` could go back epochs: this second callback rewrites ``last.ckpt`` at every save point
        # (every epoch, or every ``checkpoint.every_n_train_steps``) in the same folder.
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults(
            {
                "last_checkpoint.filename": "last",
                "last_checkpoint.monitor": None,
                "last_checkpoint.save_top_k": 1,
                "last_checkpoint.enable_version_counter": False,
            }
        )
        parser.link_arguments("checkpoint.dirpath", "last_checkpoint.dirpath")
        parser.link_arguments("checkpoint.every_n_train_steps", "last_checkpoint.every_n_train_steps")

    def instantiate_trainer(self, **kwargs):
        """Leave the default progress bar out when ``trainer.enable_progress_bar`` is false."""
        if self._get(self.config_init, "trainer.enable_progress_bar") is False:
            self.trainer_defaults["callbacks"] = [
                cb for cb in self.trainer_defaults["callbacks"] if not isinstance(cb, ThroughputProgressBar)
            ]
        return super().instantiate_trainer(**kwargs)

    def _parse_ckpt_path(self) -> None:
        """Keep the config's ``model.*``: LightningCLI would replace them with the checkpoint's hyperparameters in
        silence; the module compares the architectures when the checkpoint is loaded instead."""


def _trainer_defaults() -> dict:
    return {
        "use_distributed_sampler": False,
        "plugins": [{"class_path": "attnzoo.recipes.checkpoint_io.AtomicCheckpointIO"}],
        "callbacks": [
            ThroughputProgressBar(),
            LoggedLearningRate(logging_interval="step"),
            TrainingSummary(),
            RemoveStaleTempFiles(),
        ],
    }


def resolve_config_path(value: str) -> str:
    """``value`` if it exists, else the shipped config it names (``imagenet/nat_tiny.yaml`` or
    ``recipes/configs/imagenet/nat_tiny.yaml`` also work from an installed package)."""
    if Path(value).exists():
        return value
    relative = value.split("recipes/configs/", 1)[-1]
    shipped = CONFIG_DIR / relative
    return str(shipped) if shipped.is_file() else value


def _check_yaml(path: str) -> str:
    """Exit with a message naming ``path`` when the file is not valid YAML (jsonargparse does not name it)."""
    if Path(path).is_file():
        try:
            yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as err:
            raise SystemExit(f"attnzoo: error: config file {path} is not valid YAML:\n{err}") from err
    return path


def _resolve_config_args(args: list[str]) -> list[str]:
    out = []
    for i, arg in enumerate(args):
        if i > 0 and args[i - 1] in ("--config", "-c"):
            arg = _check_yaml(resolve_config_path(arg))
        elif arg.startswith("--config="):
            arg = "--config=" + _check_yaml(resolve_config_path(arg[len("--config=") :]))
        out.append(arg)
    return out


def run_cli(args: Sequence[str] | None = None, run: bool = True, prog: str = "attnzoo", **parser_kwargs) -> ZooCLI:
    """Parse ``args`` (``["fit", "--config", ...]``; without ``run`` no subcommand; ``None``: the command line) and
    run it; returns the CLI (``cli.trainer``, ``cli.model``, ``cli.datamodule``).

    With ``args=None`` the shipped-config names are resolved in ``sys.argv`` itself, because Lightning's DDP launcher
    starts the other ranks by re-running ``sys.argv``.
    """
    if args is None:
        sys.argv[1:] = _resolve_config_args(sys.argv[1:])
    else:
        args = _resolve_config_args(list(args))
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
    return ZooCLI(
        ImageClassifier,
        ImageDataModule,
        args=args,
        run=run,
        seed_everything_default=0,
        trainer_defaults=_trainer_defaults(),
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_kwargs={"prog": prog, **parser_kwargs},
    )


def _destroy_process_group() -> None:
    """Shut the default process group down while the interpreter is alive: left to interpreter finalization, Gloo's
    worker threads can abort the process (``terminate called without an active exception``) after a finished run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(args: Sequence[str] | None = None) -> None:
    try:
        run_cli(args)
    finally:
        _destroy_process_group()


if __name__ == "__main__":
    main()
