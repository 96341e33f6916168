"""Frozen-backbone probing: a trainable head on a frozen timm backbone (attnzoo's or timm's).

``model.probe`` of :class:`~attnzoo.recipes.module.ImageClassifier` wraps the backbone in :class:`ProbedModel`: the
backbone stays in eval mode with ``requires_grad=False`` and runs under ``torch.no_grad`` (no gradients, no state
change: BatchNorm statistics included); only the head trains. Heads (the protocol of Psomas et al., "Attention,
Please! Revisiting Attentive Probing Through the Lens of Efficiency", after MAE's linear probe): a pooling, a
non-affine ``BatchNorm1d`` and a linear classifier, where the pooling is

* ``linear``: the backbone's own pooling (``forward_head(pre_logits=True)``: class token, average...), nothing
  trained but the classifier;
* ``ep``: efficient probing (:class:`~attnzoo.layers.EfficientProbing`; ``num_queries`` 32, ``d_out`` 1);
* ``simpool``: SimPool (:class:`~attnzoo.layers.SimPool`; ``num_heads`` 1, ``gamma`` None);
* ``attentive``: attentive probing with a full cross-attention block (timm's ``AttentionPoolLatent``: one latent
  query, q/kv/out projections and an MLP; ``num_heads`` default ``dim // 64``, ``mlp_ratio`` 4),

the attention poolings reading the patch tokens (prefix tokens left out; maps flattened). ``model.probe_kwargs`` go
to the pooling (plus ``batch_norm: false`` to drop the norm).

``model.cache_features`` runs the backbone once over the training and validation sets before training
(:func:`cache_features`; ``data.augment`` must be false: one epoch-invariant view) and trains the head on the stored
features; :meth:`ProbedModel.forward` takes images or those features. The cache holds every image's head input in
host memory (tokens: ``N x C`` floats per image, pooled: ``C``), on every rank.

The export of a probe run (``model.safetensors`` + ``config.json``, the backbone's architecture and arguments with
the probe under ``pretrained_cfg.probe``) loads back with :func:`load_probed_model`.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from timm.layers import AttentionPoolLatent, trunc_normal_
from torch import nn
from torch.utils.data import DataLoader, Dataset

from attnzoo.layers import EfficientProbing, SimPool

__all__ = [
    "PROBES",
    "FeatureDataset",
    "ProbedModel",
    "cache_features",
    "extract_features",
    "feature_tokens",
    "load_probed_model",
]

PROBES = ("linear", "ep", "simpool", "attentive")


def feature_tokens(backbone: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The backbone's ``forward_features`` output as patch tokens ``(B, N, C)``: token sequences lose their
    ``num_prefix_tokens`` prefix, maps (``NCHW``, or ``NHWC`` when the model says ``output_fmt = "NHWC"``) are
    flattened."""
    if features.ndim == 3:
        return features[:, getattr(backbone, "num_prefix_tokens", 0) :]
    if features.ndim == 4:
        if getattr(backbone, "output_fmt", "NCHW") == "NCHW":
            features = features.permute(0, 2, 3, 1)
        return features.flatten(1, 2)
    raise TypeError(f"expected token (B, N, C) or map features, got shape {tuple(features.shape)}")


def _attentive_heads(dim: int) -> int:
    heads = max(1, dim // 64)
    while dim % heads:
        heads -= 1
    return heads


def _pooling(probe: str, dim: int, kwargs: dict[str, Any]) -> tuple[nn.Module, int]:
    """The probe's pooling module and its output width."""
    try:
        if probe == "linear":
            if kwargs:
                raise TypeError(f"unexpected arguments {sorted(kwargs)}")
            return nn.Identity(), dim
        if probe == "ep":
            pool = EfficientProbing(dim, input_fmt="NLC", **kwargs)
            return pool, pool.out_dim
        if probe == "simpool":
            return SimPool(dim, input_fmt="NLC", **kwargs), dim
        kwargs = {"num_heads": _attentive_heads(dim), **kwargs}
        return AttentionPoolLatent(dim, **kwargs), dim
    except TypeError as err:
        raise TypeError(f"model.probe_kwargs {sorted(kwargs)} rejected by the {probe!r} probe: {err}") from err


class ProbedModel(nn.Module):
    """A frozen backbone read by a trainable probe head.

    Args:
        backbone: a timm model (its classifier is removed; its pooling stays, for ``probe="linear"``).
        probe: one of :data:`PROBES`.
        num_classes: classifier width.
        batch_norm: the non-affine ``BatchNorm1d`` before the classifier (the probing protocol).
        **pool_kwargs: arguments of the probe's pooling (see the module docstring).

    ``forward(x)``: logits ``(B, num_classes)`` of images ``(B, C, H, W)`` or of the head inputs :meth:`extract`
    returns (tokens ``(B, N, D)``, or pooled ``(B, D)`` for ``linear``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        probe: str = "linear",
        num_classes: int = 1000,
        batch_norm: bool = True,
        **pool_kwargs: Any,
    ) -> None:
        super().__init__()
        if probe not in PROBES:
            raise ValueError(f"model.probe must be one of {PROBES}, got {probe!r}")
        if num_classes < 1:
            raise ValueError(f"a probe needs num_classes >= 1, got {num_classes}")
        backbone.reset_classifier(0)
        self.backbone = backbone.requires_grad_(False).eval()
        self.probe = probe
        self.num_classes = num_classes
        self.probe_args = dict(batch_norm=batch_norm, **pool_kwargs)
        pool, width = _pooling(probe, backbone.num_features, dict(pool_kwargs))
        fc = nn.Linear(width, num_classes)
        trunc_normal_(fc.weight, std=0.01)
        nn.init.zeros_(fc.bias)
        norm = nn.BatchNorm1d(width, affine=False, eps=1e-6) if batch_norm else nn.Identity()
        self.head = nn.Sequential(OrderedDict(pool=pool, norm=norm, fc=fc))
        self.num_features = width
        # what the data config and the export read: the backbone's input cfg, its build arguments, the probe
        self.pretrained_cfg = {**backbone.pretrained_cfg, "probe": {"kind": probe, "args": dict(self.probe_args)}}
        self._model_args = {k: v for k, v in getattr(backbone, "_model_args", {}).items() if k != "num_classes"}
        self._traits = dict(getattr(backbone, "_traits", {}))

    def train(self, mode: bool = True) -> ProbedModel:
        """Only the head switches mode; the backbone stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """The head's input for images ``(B, C, H, W)``: patch tokens ``(B, N, D)``, or the backbone's pooled
        features ``(B, D)`` for ``linear``."""
        features = self.backbone.forward_features(images)
        if self.probe == "linear":
            return self.backbone.forward_head(features, pre_logits=True)
        return feature_tokens(self.backbone, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            x = self.extract(x)
        return self.head(x)


class FeatureDataset(Dataset):
    """Items ``(features[i], targets[i])``: a backbone's features stored once (:func:`extract_features`)."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        if len(features) != len(targets):
            raise ValueError(f"{len(features)} feature rows for {len(targets)} targets")
        self.features, self.targets = features, targets

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[index], self.targets[index]


def extract_features(
    model: ProbedModel, dataset: Dataset, batch_size: int, num_workers: int = 0, device: torch.device | None = None
) -> FeatureDataset:
    """Run ``model.extract`` over ``dataset`` (items ``(image, target)``) once, in order; features kept on the CPU."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    features, targets = [], []
    for images, target in loader:
        features.append(model.extract(images.to(device)).cpu())
        targets.append(torch.as_tensor(target))
    return FeatureDataset(torch.cat(features), torch.cat(targets))


def cache_features(model: ProbedModel, datamodule: Any, device: torch.device | None = None) -> None:
    """Replace the training and validation datasets of ``datamodule`` (an
    :class:`~attnzoo.recipes.data.ImageDataModule` after ``setup("fit")``) by ``model``'s features of them."""
    hp = getattr(datamodule, "hparams", {})
    if not hasattr(datamodule, "datasets") or not hasattr(datamodule, "eval_dataset"):
        raise TypeError(f"model.cache_features needs the recipe's ImageDataModule, got {type(datamodule).__name__}")
    if hp.get("augment", True) or hp.get("aspect_ratio_bins"):
        raise ValueError(
            "model.cache_features stores one view of every image: set data.augment: false (and no "
            "data.aspect_ratio_bins), or train without the cache"
        )
    if device is not None:
        model.backbone.to(device)
    options = dict(batch_size=datamodule.eval_batch_size, num_workers=hp.get("num_workers", 0), device=device)
    datamodule.datasets["train"] = extract_features(model, datamodule.datasets["train"], **options)
    datamodule.datasets["val"] = extract_features(model, datamodule.eval_dataset("val"), **options)


def load_probed_model(folder: str | Path) -> ProbedModel:
    """The probe a recipe run exported to ``folder`` (``config.json`` + ``model.safetensors``), in eval mode."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    probe = config.get("pretrained_cfg", {}).get("probe")
    if probe is None:
        raise ValueError(f"{folder} holds no probe export (no pretrained_cfg.probe in config.json)")
    args = {k: v for k, v in config.get("model_args", {}).items() if k != "num_classes"}
    backbone = timm.create_model(config["architecture"], num_classes=0, **args)
    model = ProbedModel(backbone, probe["kind"], config["num_classes"], **probe["args"])
    model.load_state_dict(load_file(folder / "model.safetensors"))
    return model.eval()
