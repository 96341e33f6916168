"""``attnzoo convert``: any checkpoint a model's filter understands -> a timm ``local-dir`` folder.

Sources: official training pickles (read without executing code), Hugging Face NAT/DiNAT layouts, ``.safetensors``
files, and folders exported by ``attnzoo fit`` / a previous conversion (``model.safetensors`` + ``config.json``).
The result is ``<out>/model.safetensors`` + ``<out>/config.json``, which ``timm.create_model("local-dir:<out>",
pretrained=True)`` loads (and timm's ``push_to_hub`` publishes). Nothing is written unless the whole conversion
succeeds; the written folder is reloaded and checked tensor for tensor before it is moved into place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import timm
import torch

from .output_folder import check_output_folder, staged_output_folder

__all__ = ["convert_checkpoint", "load_source"]


def load_source(
    model_name: str, src: str | os.PathLike, num_classes: int | None = None, **model_kwargs: Any
) -> torch.nn.Module:
    """``model_name`` with the weights of ``src`` (a checkpoint file or an exported folder), in eval mode.

    Raises ``ValueError`` naming the file when it does not fit the model (only the classifier may differ, and then
    ``num_classes`` must say the checkpoint's class count) and ``FileNotFoundError`` when it does not exist.
    """
    src = Path(src)
    if src.is_dir():
        config_path = src / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(
                f"{src} is a folder without config.json; pass a checkpoint file or an export folder"
            )
        architecture = json.loads(config_path.read_text()).get("architecture")
        if architecture != model_name:
            raise ValueError(f"{src} holds a {architecture!r} export, not {model_name!r}")
        kwargs = {"num_classes": num_classes} if num_classes is not None else {}
        return timm.create_model(f"local-dir:{src}", pretrained=True, **kwargs, **model_kwargs).eval()
    if not src.is_file():
        raise FileNotFoundError(f"checkpoint not found: {src}")
    overlay: dict[str, Any] = {"file": str(src)}
    kwargs = dict(model_kwargs)
    if num_classes is not None:
        overlay["num_classes"] = kwargs["num_classes"] = num_classes
    return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()


def convert_checkpoint(
    model_name: str,
    src: str | os.PathLike,
    out: str | os.PathLike,
    num_classes: int | None = None,
    img_size: int | None = None,
) -> Path:
    """Convert ``src`` for ``model_name`` into the folder ``out`` (created with the umask's permissions; refused if it
    exists and is not empty, or is a symbolic link).

    Returns the path of the written ``model.safetensors``.
    """
    from attnzoo.recipes.export import export_for_timm

    out = Path(out)
    check_output_folder(out)  # before the (slow) model build
    model_kwargs = {"img_size": img_size} if img_size is not None else {}
    model = load_source(model_name, src, num_classes=num_classes, **model_kwargs)
    data_config = timm.data.resolve_data_config(model=model)
    with staged_output_folder(out) as staging:
        export_for_timm(model, staging, data_config=data_config, model_args=model_kwargs or None)
        reloaded = timm.create_model(f"local-dir:{staging}", pretrained=True)
        for key, value in model.state_dict().items():
            if not torch.equal(reloaded.state_dict()[key], value):
                raise RuntimeError(f"the written weights differ from the source at {key!r}")
    return out / "model.safetensors"
