"""What ``attnzoo detect`` and ``attnzoo segment`` share on top of :class:`~attnzoo.recipes.cli.ZooCLI`:
checkpoint arguments, a ``predictions`` writer section with the ``--render DIR`` alias, the task's final summary in
place of the classification one, and no ``predict`` with randomly initialised heads."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence

from lightning.pytorch import Callback, LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser

from .callbacks import TrainingSummary
from .cli import ZooCLI, _destroy_process_group, _resolve_config_args, _trainer_defaults

__all__ = ["TaskCLI", "run_task_cli", "task_main"]


class TaskCLI(ZooCLI):
    """A dense-prediction recipe CLI. Subclasses set ``command`` (``"detect"``), ``monitor`` (the checkpoint metric),
    ``writer`` (the prediction writer callback), ``summary`` (the final summary callback class) and ``outputs`` (what
    random heads would make meaningless, for the ``predict`` refusal)."""

    command: str
    writer: type[Callback]
    summary: type[Callback]
    outputs: str

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        self.add_checkpoint_arguments(parser)
        parser.add_lightning_class_args(self.writer, "predictions")

    def before_predict(self) -> None:
        """Refuse to predict with random heads (the backbone alone may be pretrained)."""
        config = self.config[self.subcommand]
        if not config.get("ckpt_path") and not config.get("model", {}).get("weights"):
            raise ValueError(
                f"attnzoo {self.command} predict needs --ckpt_path (last, or a .ckpt file of attnzoo {self.command} "
                "fit) or --model.weights (a folder written by attnzoo convert --config): without either the heads are "
                f"randomly initialised and the {self.outputs} meaningless"
            )


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


def run_task_cli(
    cli_class: type[TaskCLI],
    model_class: type[LightningModule],
    data_class: type[LightningDataModule],
    args: Sequence[str] | None,
    run: bool,
    prog: str,
) -> TaskCLI:
    """Parse ``args`` (``["fit", "--config", ...]``; ``None``: ``sys.argv`` after the task's word) and run it."""
    if args is None:
        # DDP ranks re-run sys.argv (``attnzoo detect fit ...``), so the config names are resolved in it in place
        start = 2 if sys.argv[1:2] == [cli_class.command] else 1
        sys.argv[start:] = _resolve_config_args(_render_alias(sys.argv[start:]))
        args = sys.argv[start:]
    else:
        args = _resolve_config_args(_render_alias(list(args)))
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
    defaults = _trainer_defaults()
    callbacks = [cb for cb in defaults["callbacks"] if type(cb) is not TrainingSummary]
    return cli_class(
        model_class,
        data_class,
        args=args,
        run=run,
        seed_everything_default=0,
        trainer_defaults={**defaults, "callbacks": [*callbacks, cli_class.summary()]},
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_kwargs={"prog": prog},
    )


def task_main(run_cli, argv: Sequence[str] | None) -> None:
    """Run a task's ``run_cli(argv)`` and always tear the process group down."""
    try:
        run_cli(argv)
    finally:
        _destroy_process_group()
