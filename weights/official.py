"""Pretrained weights from official research checkpoints, through timm's own loading path.

timm loads ``url`` / ``file`` weights with ``torch.load(weights_only=True)``, which refuses the official training
checkpoints (they pickle configs and argparse namespaces). :func:`build_model_with_official_weights` is a drop-in
replacement for ``timm.models.build_model_with_cfg`` that, when ``pretrained=True`` and the resolved cfg points at a
``url`` or ``file``, fetches the file into a per-model cache file (:func:`checkpoint_cache_path`; hash-checked when a
sha256 is known; an offline or dead link raises :class:`WeightsUnavailableError` naming that path), reads its tensors
with the restricted unpickler, and hands them to timm as the cfg's ``state_dict`` source — so the family's
``pretrained_filter_fn``, classifier resizing (``num_classes``) and ``in_chans`` adaptation all apply as usual. timm
loads non-strictly when ``num_classes`` differs from the cfg's; :func:`check_loaded_keys` then still insists that
every tensor but the classifier's comes from the checkpoint.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.parse
import urllib.request
from typing import Any

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, resolve_pretrained_cfg
from tqdm import tqdm

from .downstream import filter_without_new_norms, new_output_norm_keys
from .io import is_safetensors_file, unwrap_state_dict
from .restricted_unpickler import restricted_torch_load

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".tar", ".safetensors")


def sha256_of_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be fetched; the message says where to put the file instead."""


def checkpoint_cache_path(model: str, url: str) -> str:
    """Where the checkpoint of ``model`` (``architecture.tag``) downloaded from ``url`` is cached.

    ``<torch hub dir>/checkpoints/attnzoo/<model><suffix>``: one file per model and tag, whatever the URL looks like
    (official links end in ``/?dl=1`` or ``/root/content``, which give timm's cache no or a shared file name).
    """
    suffix = os.path.splitext(urllib.parse.urlparse(url).path.rstrip("/"))[1]
    suffix = suffix if suffix in CHECKPOINT_SUFFIXES else ".pth"
    return os.path.join(torch.hub.get_dir(), "checkpoints", "attnzoo", f"{model}{suffix}")


def _download(url: str, path: str, sha256: str | None, progress: bool, model: str | None) -> None:
    """Download ``url`` to ``path`` atomically: into a temporary file beside it, renamed only once the transfer is
    complete (``Content-Length`` bytes) and its sha256 (if given) verified; nothing is left behind otherwise."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=os.path.dirname(path), prefix=os.path.basename(path) + ".", suffix=".partial")
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            expected = response.headers.get("Content-Length")
            total = int(expected) if expected is not None else None
            with tqdm(total=total, disable=not progress, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            received = out.tell()
        if total is not None and received != total:
            raise ConnectionError(f"transfer broke off after {received} of {total} bytes")
        if sha256 is not None and digest.hexdigest() != sha256.lower():
            raise ValueError(f"sha256 mismatch for {url}: expected {sha256}, got {digest.hexdigest()}")
        os.replace(partial, path)
    except (OSError, http.client.HTTPException) as err:
        what = f"the pretrained weights of {model}" if model else "the checkpoint"
        raise WeightsUnavailableError(
            f"could not download {what} from {url} ({type(err).__name__}: {err}). To load them offline, either put "
            f"the checkpoint file at {path} (pretrained=True then reads it from there), or pass "
            "pretrained_cfg_overlay=dict(file='/path/to/checkpoint') to timm.create_model."
        ) from err
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def fetch_checkpoint(
    url_or_path: str, sha256: str | None = None, progress: bool = True, model: str | None = None
) -> str:
    """Local path of a checkpoint: a local file as is, a URL downloaded into the cache (once).

    ``model`` (``architecture.tag``) names the cache file (:func:`checkpoint_cache_path`); without it the URL's last
    path part does. With ``sha256`` the file's digest is verified (downloaded or cached) and a mismatch raises
    ``ValueError``; a download that fails raises :class:`WeightsUnavailableError` naming the cache path to fill by
    hand.
    """
    if os.path.isfile(url_or_path):
        path = url_or_path
    elif "://" in url_or_path:
        if model is not None:
            path = checkpoint_cache_path(model, url_or_path)
        else:
            name = os.path.basename(urllib.parse.urlparse(url_or_path).path.rstrip("/"))
            if not name:
                raise ValueError(f"{url_or_path!r} names no file; pass model= to name its cache file")
            path = os.path.join(torch.hub.get_dir(), "checkpoints", name)
        if not os.path.isfile(path):
            _download(url_or_path, path, sha256, progress, model)
    else:
        raise FileNotFoundError(f"checkpoint not found: {url_or_path!r} is neither a file nor a URL")
    if sha256 is not None:
        actual = sha256_of_file(path)
        if actual.lower() != sha256.lower():
            raise ValueError(f"sha256 mismatch for {path} (from {url_or_path}): expected {sha256}, got {actual}")
    return path


def read_official_checkpoint(
    url_or_path: str, sha256: str | None = None, model: str | None = None
) -> dict[str, torch.Tensor]:
    """Tensors of an official checkpoint (``.safetensors``, or a training pickle read without executing code).

    Training wrappers (``{"model": ...}``, ``{"state_dict": ...}``) and a DDP ``module.`` prefix are removed. A file
    that is not a readable checkpoint (garbage, truncated) raises ``ValueError`` naming it.
    """
    path = fetch_checkpoint(url_or_path, sha256=sha256, model=model)
    try:
        if is_safetensors_file(path):  # by content: a safetensors file named .pth is still one
            from safetensors.torch import load_file

            return load_file(path)
        return unwrap_state_dict(restricted_torch_load(path))
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(
            f"{path} is not a readable checkpoint: expected a PyTorch checkpoint (zip or legacy pickle) or a "
            f".safetensors file holding a state dict ({type(err).__name__}: {reason})"
        ) from err


def _classifier_prefixes(cfg: dict[str, Any]) -> tuple[str, ...]:
    classifier = cfg.get("classifier") or ()
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return tuple(f"{name}." for name in names)


def check_loaded_keys(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise ``ValueError`` unless ``state_dict`` (already filtered for ``model``) covers exactly the model's tensors;
    only the classifier (the cfg's ``classifier`` modules) may be missing or extra, since it is dropped when
    ``num_classes`` differs, and the output norms of a downstream backbone may be missing from classification weights
    (they start untrained, :func:`~attnzoo.weights.downstream.new_output_norm_keys`)."""
    skip = _classifier_prefixes(model.pretrained_cfg)
    new = set(new_output_norm_keys(state_dict, model))
    expected = {k for k in model.state_dict() if not k.startswith(skip) and k not in new}
    loaded = {k for k in state_dict if not k.startswith(skip)}
    missing, unexpected = sorted(expected - loaded), sorted(loaded - expected)
    if missing or unexpected:
        arch = model.pretrained_cfg.get("architecture", type(model).__name__)
        raise ValueError(
            f"{source} does not fit {arch}: {len(missing)} of its {len(expected)} tensors missing "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, {len(unexpected)} unexpected "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}; only the classifier may differ "
            "(is it a checkpoint of another model or size?)"
        )


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


def _unpruned_meta_model(model_cls: type[nn.Module], variant: str, kwargs: dict[str, Any]) -> nn.Module:
    """The model the checkpoint was loaded into, before a ``features_only`` wrapper pruned it (meta device)."""
    kwargs = {k: v for k, v in kwargs.items() if k not in ("features_only", "feature_cfg", "device")}
    return build_model_with_cfg(model_cls, variant, False, device="meta", **kwargs)


def build_model_with_official_weights(model_cls: type[nn.Module], variant: str, pretrained: bool, **kwargs: Any):
    """``timm.models.build_model_with_cfg`` that can load official training checkpoints (see module docstring)."""
    source = _official_source(variant, kwargs) if pretrained else None
    if source is None:
        return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get("pretrained_cfg"), pretrained_cfg_overlay=overlay)
    name = f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture
    path = fetch_checkpoint(source, model=name)
    state_dict = read_official_checkpoint(path, model=name)
    if path != source:  # a download: errors name the cached file, which is what to delete or replace
        source = f"{path} (the cached download of {source}; delete it to download again)"
    overlay["state_dict"] = dict(state_dict)  # filters may edit the dict they get
    filter_fn = kwargs.get("pretrained_filter_fn")
    try:
        model = build_model_with_cfg(model_cls, variant, pretrained, pretrained_cfg_overlay=overlay, **kwargs)
    except RuntimeError as err:  # timm's strict load_state_dict: state the mismatch like check_loaded_keys does
        if "Error(s) in loading state_dict" not in str(err):
            raise
        model = _unpruned_meta_model(model_cls, variant, kwargs)
        check_loaded_keys(model, filter_without_new_norms(filter_fn, dict(state_dict), model), source)
        mismatch = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
        raise ValueError(
            f"{source} does not fit {name}: {mismatch} (if only the classifier differs, pass the checkpoint's "
            "class count as num_classes)"
        ) from err
    full = _unpruned_meta_model(model_cls, variant, kwargs) if kwargs.get("features_only") else model
    check_loaded_keys(full, filter_without_new_norms(filter_fn, dict(state_dict), full), source)
    for module in model.modules():  # do not keep the loaded tensors alive through the stored cfg
        cfg = getattr(module, "pretrained_cfg", None)
        if isinstance(cfg, dict):
            cfg.pop("state_dict", None)
    return model
