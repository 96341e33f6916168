"""Pretrained weights from official research checkpoints, through timm's own loading path.

timm loads ``url`` / ``file`` weights with ``torch.load(weights_only=True)``, which refuses the official training
checkpoints (they pickle configs and argparse namespaces). :func:`build_model_with_official_weights` is a drop-in
replacement for ``timm.models.build_model_with_cfg`` that, when ``pretrained=True`` and the resolved cfg points at a
``url`` or ``file``, fetches the file into timm's cache (hash-checked when a sha256 is known), reads its tensors with
the restricted unpickler, and hands them to timm as the cfg's ``state_dict`` source — so the family's
``pretrained_filter_fn``, classifier resizing (``num_classes``) and ``in_chans`` adaptation all apply as usual.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, resolve_pretrained_cfg
from timm.models._hub import download_cached_file

from .io import unwrap_state_dict
from .restricted_unpickler import restricted_torch_load


def sha256_of_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_checkpoint(url_or_path: str, sha256: str | None = None, progress: bool = True) -> str:
    """Local path of a checkpoint: a local file as is, a URL downloaded into timm's cache (once).

    With ``sha256`` the file's digest is verified and a mismatch raises ``ValueError``.
    """
    if os.path.isfile(url_or_path):
        path = url_or_path
    elif "://" in url_or_path:
        path = download_cached_file(url_or_path, check_hash=False, progress=progress)
    else:
        raise FileNotFoundError(f"checkpoint not found: {url_or_path!r} is neither a file nor a URL")
    if sha256 is not None:
        actual = sha256_of_file(path)
        if actual.lower() != sha256.lower():
            raise ValueError(f"sha256 mismatch for {url_or_path}: expected {sha256}, got {actual}")
    return path


def read_official_checkpoint(url_or_path: str, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of an official checkpoint (``.safetensors``, or a training pickle read without executing code).

    Training wrappers (``{"model": ...}``, ``{"state_dict": ...}``) and a DDP ``module.`` prefix are removed.
    """
    path = fetch_checkpoint(url_or_path, sha256=sha256)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return unwrap_state_dict(restricted_torch_load(path))


def _official_source(variant: str, kwargs: dict[str, Any]) -> str | None:
    """The ``file`` or ``url`` timm would load for these kwargs, or None when timm's own path applies."""
    cfg = resolve_pretrained_cfg(
        variant,
        pretrained_cfg=kwargs.get("pretrained_cfg"),
        pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"),
    ).to_dict()
    if cfg.get("state_dict") is not None or cfg.get("source") in ("hf-hub", "local-dir"):
        return None
    if cfg.get("file"):
        return cfg["file"]
    if cfg.get("hf_hub_id"):  # timm prefers the hub's (weights-only) files over the url
        return None
    return cfg.get("url") or None


def build_model_with_official_weights(model_cls: type[nn.Module], variant: str, pretrained: bool, **kwargs: Any):
    """``timm.models.build_model_with_cfg`` that can load official training checkpoints (see module docstring)."""
    source = _official_source(variant, kwargs) if pretrained else None
    if source is None:
        return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    overlay["state_dict"] = read_official_checkpoint(source)
    model = build_model_with_cfg(model_cls, variant, pretrained, pretrained_cfg_overlay=overlay, **kwargs)
    for module in model.modules():  # do not keep the loaded tensors alive through the stored cfg
        cfg = getattr(module, "pretrained_cfg", None)
        if isinstance(cfg, dict):
            cfg.pop("state_dict", None)
    return model
