"""Token-merging ViTs (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023) on timm's ViT weights.

Each model is timm's ViT / DeiT with :class:`attnzoo.layers.ToMeVisionTransformer` (same parameters, same keys),
so its pretrained cfg is timm's own entry (the ``hf_hub_id`` of timm's weights) with the ToMe paper added:
``pretrained=True`` loads timm's checkpoint and merges ``r`` tokens per block off the shelf. ``r`` (an int, a
per-block list or ``(r, inflection)``), ``prop_attn`` and ``trace_source`` are model arguments, e.g.
``timm.create_model("tome_deit_small_patch16_224", r=8)``; ``r=0`` is exactly the plain model. Inputs of any size
work (``dynamic_img_size=True``; the cfgs say ``fixed_input_size=False``).

For any other timm ``VisionTransformer`` (incl. DeiT-III / LayerScale, qk-norm, register tokens and attnzoo's
gated ViTs) use :func:`attnzoo.apply_token_merging` (or :func:`attnzoo.apply_token_reduction`) on the built
model.
"""

from __future__ import annotations

from timm.models import generate_default_cfgs, register_model

from attnzoo.layers import ToMeVisionTransformer, apply_token_merging, remove_token_merging

from ._reduction_cfg import create_reducing_vit, timm_weights_cfg

__all__ = ["apply_token_merging", "remove_token_merging"]

TOME_PAPER = {
    "paper_ids": ["arXiv:2210.09461"],
    "paper_name": "Token Merging: Your ViT but Faster",
    "origin_url": "https://arxiv.org/abs/2210.09461",
}
DEIT, VIT, AUGREG = "arXiv:2012.12877", "arXiv:2010.11929", "arXiv:2106.10270"


def _create(variant: str, pretrained: bool, **kwargs) -> ToMeVisionTransformer:
    return create_reducing_vit(ToMeVisionTransformer, variant, pretrained=pretrained, **kwargs)


def _timm_cfg(timm_name: str, r: int, source: str, model_paper_ids: list[str]) -> dict:
    return timm_weights_cfg(timm_name, TOME_PAPER, f"ToMe r={r} ({source})", model_paper_ids)


default_cfgs = generate_default_cfgs(
    {
        "tome_deit_tiny_patch16_224.fb_in1k": _timm_cfg(
            "deit_tiny_patch16_224.fb_in1k", 12, "paper: 71.4 top-1", [DEIT]
        ),
        "tome_deit_small_patch16_224.fb_in1k": _timm_cfg(
            "deit_small_patch16_224.fb_in1k", 13, "paper: 79.4 top-1", [DEIT]
        ),
        "tome_vit_base_patch16_224.augreg2_in21k_ft_in1k": _timm_cfg(
            "vit_base_patch16_224.augreg2_in21k_ft_in1k", 16, "the paper's largest DeiT sweep value", [VIT, AUGREG]
        ),
    }
)


@register_model
def tome_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> ToMeVisionTransformer:
    """DeiT-Ti/16 merging r=12 tokens per block (paper: 71.4 top-1, 0.8 GFLOPs; DeiT-Ti 72.2)."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, r=12)
    return _create("tome_deit_tiny_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def tome_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> ToMeVisionTransformer:
    """DeiT-S/16 merging r=13 tokens per block (paper: 79.8 -> 79.4 top-1, 2.7 GFLOPs)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, r=13)
    return _create("tome_deit_small_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def tome_vit_base_patch16_224(pretrained: bool = False, **kwargs) -> ToMeVisionTransformer:
    """ViT-B/16 (timm AugReg2 weights) merging r=16 tokens per block (196 -> 10 patch tokens over 12 blocks)."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, r=16)
    return _create("tome_vit_base_patch16_224", pretrained, **dict(model_args, **kwargs))
