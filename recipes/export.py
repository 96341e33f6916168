"""Export trained weights as a timm-loadable folder: ``model.safetensors`` + ``config.json``.

Load the result with either::

    timm.create_model("local-dir:<folder>")  # architecture and model_args from config.json
    timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file="<folder>/model.safetensors"),
                      num_classes=..., **model_args)
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import save_file
from timm.models._hub import save_config_for_hf
from torch import nn

__all__ = ["WEIGHTS_NAME", "export_for_timm"]

WEIGHTS_NAME = "model.safetensors"


def export_for_timm(model: nn.Module, directory: str | os.PathLike, data_config: dict | None = None) -> Path:
    """Write ``model``'s state dict to ``<directory>/model.safetensors`` and timm's ``config.json`` (architecture,
    ``model_args``, ``num_classes``, preprocessing from ``data_config``); returns the weights path."""
    if not hasattr(model, "pretrained_cfg"):
        raise TypeError(f"expected a model built by timm.create_model, got {type(model).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = directory / WEIGHTS_NAME
    save_file(tensors, str(weights), metadata={"format": "pt"})
    save_config_for_hf(model, str(directory / "config.json"), data_config=data_config)
    return weights
