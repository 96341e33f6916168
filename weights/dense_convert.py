"""``attnzoo convert --config <recipe yaml> --src <checkpoint> --out <dir>``: released dense-prediction checkpoints
(mmdetection / mmsegmentation ``{meta, state_dict}`` files) -> the recipe's LightningModule, saved as a folder.

The config's ``model`` section builds the module on the CPU (no pretrained backbone download); the module's class
picks the key mapper from :data:`MAPPERS`; the mapped state dict must cover the module exactly (every source key
placed, every module tensor given, same shapes), else ``ValueError`` naming the keys. The folder holds
``model.safetensors`` (the module's own state-dict keys) and ``meta.json`` (source file, its sha256, config,
module class, categories); it is written beside ``out`` and renamed into place only when complete, so a failed
conversion leaves nothing. The module's ``weights`` argument loads such a folder (:func:`load_converted`), e.g.
``attnzoo detect test --config X --model.weights OUT``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from .io import unwrap_state_dict
from .official import sha256_of_file
from .output_folder import check_output_folder, staged_output_folder
from .restricted_unpickler import restricted_torch_load

__all__ = ["MAPPERS", "convert_dense_checkpoint", "load_converted", "read_dense_checkpoint"]

#: LightningModule class name -> ``"module:function"`` mapping a source state dict onto that module's state dict.
MAPPERS: dict[str, str] = {
    "ObjectDetector": "attnzoo.weights.mmdet:map_state_dict",
    "SemanticSegmenter": "attnzoo.weights.mmseg:map_state_dict",
}

FORMAT = "attnzoo-dense/1"


def _import(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def read_dense_checkpoint(src: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, meta)`` of an mmdet/mmseg checkpoint: ``torch.load(weights_only=True)``, or the restricted
    unpickler (no code runs) for files that pickle other objects; ``meta`` is ``{}`` when the file has none."""
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"checkpoint not found: {src}")
    try:
        checkpoint = torch.load(src, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001  (torch raises UnpicklingError/RuntimeError for disallowed globals)
        try:
            checkpoint = restricted_torch_load(src)
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"{src} is not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{src} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    meta = checkpoint.get("meta") if isinstance(checkpoint.get("meta"), Mapping) else {}
    return unwrap_state_dict(checkpoint), dict(meta)


def _model_section(config: str | os.PathLike) -> dict[str, Any]:
    """The ``model`` section of a recipe YAML (a shipped name such as ``coco/x.yaml`` resolves too)."""
    from attnzoo.recipes.cli import resolve_config_path

    path = Path(resolve_config_path(str(config)))
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {config}")
    data = yaml.safe_load(path.read_text()) or {}
    model = data.get("model")
    if not isinstance(model, Mapping):
        raise ValueError(f"{path} has no 'model' section")
    return dict(model)


def _module_class(model: dict[str, Any]) -> tuple[type, dict[str, Any]]:
    """The LightningModule class of a ``model`` section and its init arguments: ``class_path`` / ``init_args``
    when given, else the one class of :data:`MAPPERS` (looked up in ``attnzoo.recipes``) whose ``__init__``
    accepts every key."""
    import attnzoo.recipes as recipes

    if "class_path" in model:
        module_name, _, class_name = str(model["class_path"]).rpartition(".")
        return _import(f"{module_name}:{class_name}"), dict(model.get("init_args") or {})
    candidates = []
    for name in MAPPERS:
        cls = getattr(recipes, name)
        if set(model) <= set(inspect.signature(cls.__init__).parameters) - {"self"}:
            candidates.append(cls)
    if len(candidates) != 1:
        names = [c.__name__ for c in candidates] or list(MAPPERS)
        raise ValueError(
            f"cannot tell which module the config's model section ({sorted(model)[:6]}...) is for "
            f"(candidates {names}); give model.class_path"
        )
    return candidates[0], model


def build_module(config: str | os.PathLike) -> nn.Module:
    """The config's LightningModule on the CPU, without pretrained backbone weights."""
    cls, kwargs = _module_class(_model_section(config))
    if cls.__name__ not in MAPPERS:
        raise ValueError(f"no checkpoint mapper for {cls.__name__}; known: {', '.join(MAPPERS)}")
    params = inspect.signature(cls.__init__).parameters
    for name, value in (("pretrained_backbone", False), ("weights", None)):
        if name in params:
            kwargs[name] = value
    return cls(**kwargs)


def _check_cover(module: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """``ValueError`` unless ``state`` has exactly the module's state-dict keys with the same shapes."""
    target = module.state_dict()
    missing = [k for k in target if k not in state]
    extra = [k for k in state if k not in target]
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in target.items() if k in state
              and tuple(state[k].shape) != tuple(v.shape)]  # fmt: skip
    problems = []
    if missing:
        problems.append(f"{len(missing)} module tensors not in {source}, e.g. {missing[:6]}")
    if extra:
        problems.append(f"{len(extra)} tensors of {source} not in the module, e.g. {extra[:6]}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (source vs module), e.g. {shapes[:4]}")
    if problems:
        raise ValueError(f"{source} does not fit {type(module).__name__}: " + "; ".join(problems))


def _check_classes(module: nn.Module, meta: dict[str, Any], source: str) -> None:
    """The checkpoint's class names (mmdet/mmseg ``meta["CLASSES"]``) against the module's categories: named
    categories must agree; numbered ones take the names."""
    classes = meta.get("CLASSES")
    categories = getattr(module, "categories", None)
    if not classes or not categories:
        return
    classes = [str(c) for c in classes]
    if len(classes) != len(categories):
        raise ValueError(f"{source} was trained on {len(classes)} classes, the config has {len(categories)}")
    names = [str(c["name"]) for c in categories]
    if names == [str(c["id"]) for c in categories]:  # numbered placeholders
        module.categories = [{"id": c["id"], "name": n} for c, n in zip(categories, classes)]
    elif names != classes:
        diff = [(a, b) for a, b in zip(names, classes) if a != b][:5]
        raise ValueError(f"{source} classes differ from the module's categories, e.g. (module, checkpoint) {diff}")


def convert_dense_checkpoint(config: str | os.PathLike, src: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Convert ``src`` (an mmdet/mmseg checkpoint) for the module of ``config`` into the new folder ``out``
    (``model.safetensors`` + ``meta.json``); returns ``out``. Nothing is written unless everything maps."""
    from safetensors.torch import load_file, save_file

    out = Path(out)
    check_output_folder(out)  # before the (slow) module build
    module = build_module(config)
    state, meta = read_dense_checkpoint(src)
    mapper: Callable[[nn.Module, dict[str, Tensor]], dict[str, Tensor]] = _import(MAPPERS[type(module).__name__])
    mapped = mapper(module, state)
    _check_cover(module, mapped, str(src))
    module.load_state_dict(mapped, strict=True)
    _check_classes(module, meta, str(src))
    tensors = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    info = {
        "format": FORMAT,
        "module": type(module).__name__,
        "config": str(config),
        "source": Path(src).name,
        "sha256": sha256_of_file(src),
        "source_meta": {k: meta[k] for k in ("mmdet_version", "mmseg_version", "mmcv_version") if k in meta},
        "categories": getattr(module, "categories", None),
    }
    with staged_output_folder(out) as staging:
        save_file(tensors, str(staging / "model.safetensors"))
        (staging / "meta.json").write_text(json.dumps(info, indent=2) + "\n")
        reloaded = load_file(str(staging / "model.safetensors"))
        if reloaded.keys() != tensors.keys() or any(not torch.equal(reloaded[k], v) for k, v in tensors.items()):
            raise RuntimeError(f"the written weights differ from the converted module ({staging})")
    return out


def load_converted(module: nn.Module, folder: str | os.PathLike) -> list[dict[str, Any]] | None:
    """Load a folder written by :func:`convert_dense_checkpoint` into ``module`` strictly; returns its categories.

    Raises ``FileNotFoundError`` for a folder without ``model.safetensors`` / ``meta.json`` and ``ValueError``
    when it was written for another module class or does not cover the module exactly.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    weights, meta_path = folder / "model.safetensors", folder / "meta.json"
    if not weights.is_file() or not meta_path.is_file():
        raise FileNotFoundError(f"weights {folder}: expected a folder with model.safetensors and meta.json")
    meta = json.loads(meta_path.read_text())
    if meta.get("module") != type(module).__name__:
        raise ValueError(f"weights {folder} were converted for {meta.get('module')!r}, not {type(module).__name__}")
    state = load_file(str(weights))
    _check_cover(module, state, str(weights))
    module.load_state_dict(state, strict=True)
    return meta.get("categories")
