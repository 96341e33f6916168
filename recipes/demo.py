"""``attnzoo demo``: train a small zoo model on real digits shipped in a PyPI wheel, evaluate it on the held-out
split, export the weights and check that timm loads them.

It is ``attnzoo fit --config recipes/configs/demo/gated_vit_mnist.yaml`` followed by ``test`` on the held-out
digits; every option of the config can be overridden on the command line (``attnzoo demo --trainer.max_epochs 3``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from torch.utils.data import DataLoader

from .callbacks import ExportWeights
from .cli import CONFIG_DIR, run_cli

__all__ = ["DEMO_CONFIG", "evaluate_exported", "run_training_demo"]

DEMO_CONFIG = CONFIG_DIR / "demo" / "gated_vit_mnist.yaml"


@torch.inference_mode()
def evaluate_exported(weights_dir: str | Path, loader: DataLoader) -> float:
    """Top-1 accuracy of the model reloaded with ``timm.create_model("local-dir:<weights_dir>", pretrained=True)``
    on ``loader`` (batches ``(images, targets[, is_real])``)."""
    model = timm.create_model(f"local-dir:{weights_dir}", pretrained=True).eval()
    correct = total = 0
    for batch in loader:
        real = batch[2] if len(batch) > 2 else torch.ones_like(batch[1], dtype=torch.bool)
        pred = model(batch[0]).argmax(-1)
        correct += int((pred == batch[1])[real].sum())
        total += int(real.sum())
    return correct / max(total, 1)


def run_training_demo(args: Sequence[str] = ()) -> dict:
    """Run the demo with LightningCLI-style ``args`` (``--config`` defaults to :data:`DEMO_CONFIG`); returns the
    held-out metrics and the exported weights path."""
    cli = run_cli(list(args), run=False, prog="attnzoo demo", default_config_files=[str(DEMO_CONFIG)])
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    trainer.fit(model, datamodule=datamodule)
    results = trainer.test(model, datamodule=datamodule)[0]
    export = next(cb for cb in trainer.callbacks if isinstance(cb, ExportWeights))
    weights = export.weights_path
    reloaded = evaluate_exported(weights.parent, datamodule.test_dataloader()) if trainer.is_global_zero else None
    summary = {
        "test_top1": results.get("test/top1"),
        "test_ema_top1": results.get("test_ema/top1"),
        "exported_top1": reloaded,
        "num_test_images": int(results.get("test/images", 0)),
        "weights": str(weights),
    }
    if trainer.is_global_zero:
        ema = f", EMA {summary['test_ema_top1']:.2%}" if summary["test_ema_top1"] is not None else ""
        print(
            f"demo finished: held-out top-1 {summary['test_top1']:.2%}{ema} on {summary['num_test_images']} images; "
            f"exported weights reload in timm with top-1 {reloaded:.2%}: {weights}\n"
            f"  load them: timm.create_model('local-dir:{weights.parent}', pretrained=True)",
            flush=True,
        )
    return summary
