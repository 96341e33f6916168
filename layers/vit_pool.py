"""Attention-pooling heads (SimPool, efficient probing) on timm's plain ``VisionTransformer``.

timm's ViT pools through ``attn_pool`` when it has one (patch tokens only, unless ``pool_include_prefix``), then
``fc_norm`` and ``head``; its ``reset_classifier`` and constructor know only timm's own attention pools. The mixin
below adds ``global_pool="simpool"`` / ``"ep"`` to both: the pooling module (:func:`create_attention_pool`, on
``(B, N, C)`` tokens after the final norm) becomes ``attn_pool`` and the classifier reads its ``embed_dim`` output.
"""

from __future__ import annotations

from typing import Any

from timm.layers import get_device_dtype
from timm.models.vision_transformer import VisionTransformer

from .pool_head import ATTENTION_POOL_TYPES, create_attention_pool

__all__ = ["AttentionPoolViTMixin", "ZooVisionTransformer"]


class AttentionPoolViTMixin:
    """``global_pool="simpool"`` / ``"ep"`` for a ``VisionTransformer`` subclass (put it before
    ``VisionTransformer`` in the bases), in the constructor and in ``reset_classifier``; the pool reads the patch
    tokens (prefix tokens too with ``pool_include_prefix``). Any other pool type is timm's and removes the attention
    pool."""

    def __init__(self, *args: Any, global_pool: str = "token", **kwargs: Any) -> None:
        attention = global_pool in ATTENTION_POOL_TYPES
        super().__init__(*args, global_pool="" if attention else global_pool, **kwargs)  # "": final norm on tokens
        if attention:
            self.reset_classifier(self.num_classes, global_pool)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in ATTENTION_POOL_TYPES:
            super().reset_classifier(num_classes, global_pool)
            return
        current = getattr(self.attn_pool, "pool_type", None)
        pool = self.attn_pool
        if current != global_pool:
            pool = create_attention_pool(global_pool, self.embed_dim, input_fmt="NLC", **get_device_dtype(self))
            pool.train(self.training)
        super().reset_classifier(num_classes, "")  # timm's head reset (drops any attention pool)
        self.attn_pool = pool
        self.global_pool = global_pool


class ZooVisionTransformer(AttentionPoolViTMixin, VisionTransformer):
    """timm's ``VisionTransformer`` (same parameters, keys and API) with ``global_pool="simpool"`` / ``"ep"``: the
    base of the zoo's plain ViTs."""
