"""Export trained weights as a timm-loadable folder: ``model.safetensors`` + ``config.json``.

Load the result with either::

    timm.create_model("local-dir:<folder>", pretrained=True)  # architecture and model_args from config.json
    timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file="<folder>/model.safetensors"),
                      num_classes=..., **model_args)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from safetensors.torch import save
from timm.models._hub import save_config_for_hf
from torch import nn

from .checkpoint_io import atomic_write

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "export_for_timm"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def export_for_timm(
    model: nn.Module,
    directory: str | os.PathLike,
    data_config: dict | None = None,
    label_names: Sequence[str] | None = None,
    model_args: dict | None = None,
) -> Path:
    """Write ``model``'s state dict to ``<directory>/model.safetensors`` and timm's ``config.json`` (architecture,
    ``model_args``: the keywords ``timm.create_model`` needs besides the name, ``num_classes``, preprocessing from
    ``data_config``, ``label_names``: the class of every output); returns the weights path. The weights are written
    atomically, through a temporary file, so a link planted at either name is replaced, never written through; both
    files get the umask's permissions. ``timm.create_model("local-dir:<directory>", pretrained=True)`` loads them
    (without ``pretrained=True`` timm builds the architecture with random weights)."""
    if not hasattr(model, "pretrained_cfg"):
        raise TypeError(f"expected a model built by timm.create_model, got {type(model).__name__}")
    if label_names is not None and len(label_names) != model.num_classes:
        raise ValueError(f"label_names has {len(label_names)} names for {model.num_classes} model outputs")
    directory = Path(directory)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = atomic_write(directory / WEIGHTS_NAME, lambda f: f.write(save(tensors, metadata={"format": "pt"})))
    model_config = {"label_names": list(label_names)} if label_names is not None else None
    with tempfile.TemporaryDirectory() as private:  # timm writes to a path; the result is moved in atomically
        config = Path(private) / CONFIG_NAME
        save_config_for_hf(
            model, str(config), model_config=model_config, model_args=model_args, data_config=data_config
        )
        atomic_write(directory / CONFIG_NAME, config.read_bytes())
    return weights
