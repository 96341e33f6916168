"""The token-mixer interface and registry.

A token mixer maps a channels-last feature map ``(B, H, W, C) -> (B, H, W, C)`` for any ``H, W`` its kind supports, so
any mixer plugs into any stage of :class:`attnzoo.layers.HierarchicalVisionTransformer` and a config can swap mixers by
name. Every mixer class registered here is constructed as ``cls(dim, num_heads=..., gate=..., device=..., dtype=...,
**kind_specific_kwargs)`` and may expose ``no_weight_decay() -> set[str]`` naming its own parameters (relative
position tables, ...) that should not be decayed.

Every mixer is called the same way, ``mixer(x, feat_size=None, attn_mask=None, is_causal=False)``:

* ``feat_size``: the patch grid ``[H, W]`` of a token sequence ``(B, P + H*W, C)`` (plain ViTs with ``P`` prefix
  tokens); mixers that need no grid, or take maps (which carry it), ignore it;
* ``attn_mask`` / ``is_causal``: as in ``F.scaled_dot_product_attention``, for mixers that attend over a whole
  sequence; the others raise ``ValueError`` when given one (:func:`check_no_attn_mask`).

Mixers on maps that take no mask subclass :class:`MapTokenMixer` and implement ``mix(x)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
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


def check_no_attn_mask(attn_mask: torch.Tensor | None, is_causal: bool) -> None:
    """Raise ``ValueError`` if a mask reaches a token mixer that takes none."""
    if attn_mask is not None or is_causal:
        raise ValueError("attn_mask/is_causal given, but this token mixer takes no attention mask")


class MapTokenMixer(nn.Module):
    """Base of the token mixers on channels-last maps that take no attention mask.

    ``forward`` has the one call form: it rejects masks, ignores ``feat_size`` (a map carries its grid) and returns
    ``self.mix(x)``, which subclasses implement.
    """

    def forward(
        self,
        x: torch.Tensor,
        feat_size: list[int] | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        check_no_attn_mask(attn_mask, is_causal)
        return self.mix(x)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B, H, W, C)``."""
        raise NotImplementedError
