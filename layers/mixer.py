"""The token-mixer interface and registry.

A token mixer maps a channels-last feature map ``(B, H, W, C) -> (B, H, W, C)`` for any ``H, W`` its kind supports, so
any mixer plugs into any stage of :class:`attnzoo.layers.HierarchicalVisionTransformer` and a config can swap mixers by
name. Every mixer class registered here is constructed as ``cls(dim, num_heads=..., gate=..., device=..., dtype=...,
**kind_specific_kwargs)`` and may expose ``no_weight_decay() -> set[str]`` naming its own parameters (relative
position tables, ...) that should not be decayed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

_MIXERS: dict[str, Callable[..., nn.Module]] = {}


def register_mixer(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator that registers a token mixer under ``name``."""

    def _register(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _MIXERS and _MIXERS[name] is not cls:
            raise ValueError(f"a token mixer named {name!r} is already registered ({_MIXERS[name].__qualname__})")
        _MIXERS[name] = cls
        return cls

    return _register


def list_mixers() -> list[str]:
    """Names of the registered token mixers."""
    return sorted(_MIXERS)


def get_mixer(name: str) -> Callable[..., nn.Module]:
    """The mixer class registered under ``name``."""
    try:
        return _MIXERS[name]
    except KeyError:
        raise ValueError(f"unknown token mixer {name!r}; registered mixers: {list_mixers()}") from None


def create_mixer(name: str, dim: int, num_heads: int, **kwargs) -> nn.Module:
    """Build the mixer registered under ``name`` for ``dim`` channels and ``num_heads`` heads."""
    return get_mixer(name)(dim, num_heads=num_heads, **kwargs)
