"""Official downstream backbones (COCO detection / ADE20K segmentation): their checkpoints, and the classification
weights that initialise them.

The downstream backbones are the zoo models built with their downstream keyword arguments (``out_norms=True``,
``downstream_agent_shapes=...``, see the README's "Downstream backbones"). Their output norms are ``out_norms.{i}``;
the released mmdet / mmseg checkpoints name them ``norm{i}`` (NAT, DiNAT, Agent-Swin) or ``extra_norms.{i}``
(BiFormer), which each family's ``checkpoint_filter_fn`` maps.

* :func:`add_new_output_norms` (used by those filters): a classification checkpoint has no output norms; the model's
  own freshly initialised ones are added to it (and named in a warning), so that timm's strict loading of classification
  weights (``pretrained=True``) builds the downstream backbone.
* :func:`convert_backbone_state`: a released downstream backbone state dict (``backbone.`` prefix removed) onto a
  zoo model's keys, strictly.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable, Mapping
from types import ModuleType

import torch
import torch.nn as nn
from timm.models import get_arch_name, model_entrypoint
from timm.models._features import FeatureGetterNet

__all__ = [
    "DOWNSTREAM_FAMILIES",
    "OUT_NORMS",
    "add_new_output_norms",
    "convert_backbone_state",
    "family_module",
    "filter_without_new_norms",
    "new_output_norm_keys",
    "warn_new_keys",
    "zoo_filter",
]

_logger = logging.getLogger(__name__)

OUT_NORMS = "out_norms."
"""Key prefix of the output norms of a downstream backbone (``out_norms.{i}.weight`` / ``.bias``)."""

DOWNSTREAM_FAMILIES = (
    "attnzoo.nat",
    "attnzoo.biformer",
    "attnzoo.agent_swin",
    "attnzoo.agent_pvt",
    "attnzoo.rmt",
    "attnzoo.ppma",
)
"""Model modules whose official downstream checkpoints :func:`convert_backbone_state` maps."""

_CLASSIFICATION_ONLY = ("head.", "norm.")
"""A full (not ``features_only``) model's classifier and final norm: not part of any downstream checkpoint."""


def new_output_norm_keys(state: Mapping[str, torch.Tensor], model: nn.Module) -> list[str]:
    """The output-norm keys of ``model`` that start untrained when ``state`` (in ``model``'s keys) is loaded: all of
    them when ``state`` has no output norm (a classification checkpoint), none otherwise."""
    if any(k.startswith(OUT_NORMS) for k in state):
        return []
    return sorted(k for k in model.state_dict() if k.startswith(OUT_NORMS))


def warn_new_keys(keys: list[str], source: str = "the checkpoint") -> None:
    """Log (warning) the tensors that are not in ``source`` and start untrained."""
    if keys:
        _logger.warning(
            "%d tensors are not in %s and start untrained (the downstream backbone's new output norms): %s",
            len(keys),
            source,
            ", ".join(keys),
        )


def add_new_output_norms(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` (already in ``model``'s keys) plus ``model``'s own output-norm tensors when ``state`` has none (a
    classification checkpoint: the output norms start untrained, as in the official downstream code); a warning
    names them. A ``state`` with some output norms is returned unchanged (its gaps stay errors of a strict load)."""
    new = new_output_norm_keys(state, model)
    if not new:
        return state
    warn_new_keys(new)
    target = model.state_dict()
    return {**state, **{k: target[k] for k in new}}


def family_module(model_name: str) -> ModuleType:
    """The module that registers timm model ``model_name`` (a pretrained tag such as ``.in1k`` is allowed)."""
    return importlib.import_module(model_entrypoint(get_arch_name(model_name)).__module__)


def zoo_filter(model_name: str) -> Callable[..., dict[str, torch.Tensor]] | None:
    """The ``checkpoint_filter_fn`` of ``model_name``'s attnzoo family (official layouts -> attnzoo keys), or None
    for a model outside attnzoo."""
    module = family_module(model_name)
    return getattr(module, "checkpoint_filter_fn", None) if module.__name__.startswith("attnzoo.") else None


def filter_without_new_norms(
    filter_fn: Callable[..., dict[str, torch.Tensor]] | None, state: dict[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    """``state`` through ``filter_fn`` (None: unchanged) without the untrained output norms the zoo filters add."""
    if filter_fn is None:
        return state
    no_fill = {"new_output_norms": False} if "new_output_norms" in inspect.signature(filter_fn).parameters else {}
    return filter_fn(state, model, **no_fill)


def _named(keys: list[str], source_of: Mapping[int, str], converted: Mapping[str, torch.Tensor]) -> list[str]:
    """Converted keys, each with the checkpoint key it came from when the tensor passed through unchanged."""
    names = []
    for key in keys:
        source = source_of.get(id(converted[key]))
        names.append(f"{source} (-> {key})" if source is not None and source != key else key)
    return names


def _listing(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def convert_backbone_state(
    model_name: str, state: Mapping[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    """An official downstream backbone state dict -> ``model``'s state-dict keys, strictly.

    Args:
        model_name: the timm name ``model`` was built from (``"dinat_mini"``, ``"biformer_small"``, ...).
        state: the backbone of a released mmdet / mmseg checkpoint with the ``backbone.`` prefix removed, in the
            official key layout (NAT / DiNAT ``patch_embed``, ``levels.i...``, ``norm0..3``; BiFormer
            ``downsample_layers``, ``stages.i.j...``, ``extra_norms.0..3``; Agent-Swin ``patch_embed``,
            ``layers.i.blocks.j...``, ``norm0..3``; Agent-PVT ``patch_embed{1-4}``, ``pos_embed{1-4}``,
            ``block{1-4}.j...``; PPMA ``patch_embed``, ``layers.i.blocks.j...``, ``outnorm0..3``); attnzoo keys pass
            unchanged.
        model: the downstream backbone, built with the downstream kwargs (``features_only=True`` or the full model,
            whose classifier and final norm are not in the checkpoint and keep their values).

    Returns:
        A state dict that ``model.load_state_dict(..., strict=False)`` loads completely (keys prefixed ``model.``
        for a ``features_only`` net). Agent biases and position embeddings are resampled as the family's filter does.

    Raises:
        ValueError: naming the checkpoint keys that map onto no tensor of ``model`` (e.g. output norms of a model
            built without ``out_norms=True``), the tensors of ``model`` the checkpoint lacks, and shape mismatches.
    """
    module = family_module(model_name)
    if module.__name__ not in DOWNSTREAM_FAMILIES:
        families = ", ".join(name.rsplit(".", 1)[-1] for name in DOWNSTREAM_FAMILIES)
        raise ValueError(f"no official downstream backbone layout for {model_name!r}; known families: {families}")
    if any(k.startswith("backbone.") for k in state):
        raise ValueError("state has keys starting with 'backbone.': pass the backbone tensors with the prefix removed")
    features = isinstance(model, FeatureGetterNet)
    inner = model.model if features else model
    source_of = {id(v): k for k, v in state.items()}
    # no untrained output norms are added: a downstream checkpoint lacking them is an error here
    converted = filter_without_new_norms(module.checkpoint_filter_fn, dict(state), inner)
    target = inner.state_dict()
    leftover = sorted(k for k in converted if k not in target)
    missing = sorted(k for k in target if k not in converted and not k.startswith(_CLASSIFICATION_ONLY))
    mismatched = sorted(
        f"{k} {tuple(converted[k].shape)} vs {tuple(target[k].shape)}"
        for k in converted
        if k in target and converted[k].shape != target[k].shape
    )
    if leftover or missing or mismatched:
        problems = []
        if leftover:
            hint = (
                " (output norms: build the model with out_norms=True)"
                if any(k.startswith(OUT_NORMS) for k in leftover)
                else ""
            )
            problems.append(
                f"{len(leftover)} checkpoint tensors map onto nothing{hint}: "
                + _listing(_named(leftover, source_of, converted))
            )
        if missing:
            problems.append(f"{len(missing)} model tensors are not in the checkpoint: {_listing(missing)}")
        if mismatched:
            problems.append(f"{len(mismatched)} shapes differ: {_listing(mismatched)}")
        raise ValueError(f"the checkpoint does not fit the {model_name} downstream backbone: " + "; ".join(problems))
    prefix = "model." if features else ""
    return {prefix + k: v for k, v in converted.items()}
