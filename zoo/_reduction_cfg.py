"""Shared builders of the token-reduction families (ToMe, PPT, Token Pooling): timm's ViT / DeiT weights through
copied timm cfgs, with the method's paper added."""

from __future__ import annotations

from typing import Any

from timm.models import get_pretrained_cfg
from timm.models.vision_transformer import checkpoint_filter_fn

from attnzoo.layers import TokenReductionVisionTransformer
from attnzoo.weights import build_model_with_official_weights

__all__ = ["create_reducing_vit", "timm_weights_cfg"]


def create_reducing_vit(
    model_cls: type[TokenReductionVisionTransformer], variant: str, pretrained: bool = False, **kwargs: Any
) -> TokenReductionVisionTransformer:
    """timm's ``_create_vision_transformer`` with a token-reduction class; inputs of any size
    (``dynamic_img_size``)."""
    out_indices = kwargs.pop("out_indices", 3)
    kwargs.setdefault("dynamic_img_size", True)
    kwargs.setdefault("dynamic_img_pad", True)
    return build_model_with_official_weights(
        model_cls,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def timm_weights_cfg(timm_name: str, paper: dict[str, Any], note: str, model_paper_ids: list[str]) -> dict[str, Any]:
    """timm's pretrained cfg of ``timm_name`` (its weights) plus the reduction ``paper`` (``paper_ids``,
    ``paper_name``, ``origin_url``) and a ``note`` on the setting."""
    cfg = get_pretrained_cfg(timm_name).to_dict()
    for key in ("architecture", "tag"):
        cfg.pop(key, None)
    return {
        **cfg,
        "fixed_input_size": False,
        **paper,
        "paper_ids": paper["paper_ids"] + model_paper_ids,
        "notes": (f"timm weights {timm_name}; {note}",),
    }
