"""Classifier heads with attention pooling: SimPool (``"simpool"``) and efficient probing (``"ep"``).

:class:`AttentionPoolClassifierHead` is timm's ``ClassifierHead`` that also takes these two pool types, so a model
switches between them and timm's pool types with ``reset_classifier(num_classes, pool_type)``.
:func:`create_attention_pool` builds the pooling module alone (plain ViTs hold it as timm's ``attn_pool``).
"""

from __future__ import annotations

import torch.nn as nn
from timm.layers import ClassifierHead, get_device_dtype

from .efficient_probing import EfficientProbing
from .simpool import SimPool

__all__ = ["ATTENTION_POOL_TYPES", "AttentionPoolClassifierHead", "SimPoolClassifierHead", "create_attention_pool"]

ATTENTION_POOL_TYPES = ("simpool", "ep")


def create_attention_pool(
    pool_type: str,
    dim: int,
    input_fmt: str = "NHWC",
    simpool_heads: int = 1,
    simpool_gamma: float | None = None,
    ep_queries: int = 32,
    device=None,
    dtype=None,
) -> SimPool | EfficientProbing:
    """The attention pooling named by ``pool_type`` (one of :data:`ATTENTION_POOL_TYPES`), ``dim`` channels in,
    ``dim`` out."""
    if pool_type == "simpool":
        return SimPool(
            dim, num_heads=simpool_heads, gamma=simpool_gamma, input_fmt=input_fmt, device=device, dtype=dtype
        )
    if pool_type == "ep":
        return EfficientProbing(dim, num_queries=ep_queries, input_fmt=input_fmt, device=device, dtype=dtype)
    raise ValueError(f"attention pool_type must be one of {ATTENTION_POOL_TYPES}, got {pool_type!r}")


class AttentionPoolClassifierHead(ClassifierHead):
    """timm's ``ClassifierHead`` that also accepts ``pool_type="simpool"`` (:class:`SimPool`) and ``"ep"``
    (:class:`EfficientProbing`, ``ep_queries`` queries).

    Other pool types behave as in ``ClassifierHead``; ``reset(num_classes, pool_type)`` switches between all of them (a
    new attention pool is created when switching to another kind or when ``in_features`` changes; ``reset(n)`` keeps
    the trained one).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        pool_type: str = "simpool",
        drop_rate: float = 0.0,
        input_fmt: str = "NHWC",
        simpool_heads: int = 1,
        simpool_gamma: float | None = None,
        ep_queries: int = 32,
        device=None,
        dtype=None,
    ) -> None:
        attention = pool_type in ATTENTION_POOL_TYPES
        super().__init__(
            in_features,
            num_classes,
            pool_type="" if attention else pool_type,
            drop_rate=drop_rate,
            input_fmt=input_fmt,
            device=device,
            dtype=dtype,
        )
        self.pool_args = dict(simpool_heads=simpool_heads, simpool_gamma=simpool_gamma, ep_queries=ep_queries)
        if attention:
            self.global_pool = self._attention_pool(pool_type, device=device, dtype=dtype)

    def _attention_pool(self, pool_type: str, device=None, dtype=None) -> nn.Module:
        pool = create_attention_pool(
            pool_type, self.in_features, input_fmt=self.input_fmt, device=device, dtype=dtype, **self.pool_args
        )
        return pool.train(self.training)

    def reset(
        self,
        num_classes: int,
        pool_type: str | None = None,
        reset_other: bool = False,
        in_features: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        current = self.global_pool.pool_type
        target = current if pool_type is None else pool_type
        if target in ATTENTION_POOL_TYPES:
            if in_features is not None:
                self.in_features = in_features
            if current != target or self.global_pool.dim != self.in_features:
                self.global_pool = self._attention_pool(target, **get_device_dtype(self, device=device, dtype=dtype))
            pool_type = None
        super().reset(num_classes, pool_type, reset_other, in_features, device=device, dtype=dtype)


SimPoolClassifierHead = AttentionPoolClassifierHead  # the name from before EP joined (pools with SimPool by default)
