"""MoH ViTs: DeiT-S/B with mixture-of-head attention (Jin et al., 2024, "MoH: Multi-Head Attention as
Mixture-of-Head Attention", arXiv:2410.11842) in every block.

The gated ViT (:mod:`attnzoo.gated_vit`) with ``gate="moh"``: each token weights its heads with a learned router,
``moh_shared_heads`` heads always active and the top ``moh_topk`` of the others (:class:`~attnzoo.layers.MoHGate`).
Settings (ours; the paper's ViTs are TransNeXt-based, whose 12-head stage of MoH-ViT-S-75 has 3 shared + top-6 of 9
routed heads): ViT-B 12 heads, 3 shared + top-6 of 9 (75% of the heads active per token); ViT-S 6 heads, 2 shared +
top-2 of 4 (67%). Both are arguments (``timm.create_model("moh_vit_small_patch16_224", moh_topk=3)``).

No official weights exist for these models (the official MoH-ViT checkpoints are TransNeXt models): the cfgs have no
weight source. Train with the classification recipe, which adds the router's load-balance loss
(``model.moh_balance_weight``, the paper's 0.01).
"""

from __future__ import annotations

from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from .gated_vit import _cfg as _gated_cfg
from .gated_vit import _create_gated_vit

__all__: list[str] = []


def _cfg(**kwargs) -> dict:
    return _gated_cfg(
        paper_ids=["arXiv:2410.11842", "arXiv:2012.12877"],
        paper_name="MoH: Multi-Head Attention as Mixture-of-Head Attention; Training data-efficient image transformers",
        origin_url="https://arxiv.org/abs/2410.11842",
        notes=("no official weights exist for this model (the official MoH-ViT weights are TransNeXt models)",),
        **kwargs,
    )


default_cfgs = generate_default_cfgs(
    {
        "moh_vit_small_patch16_224": _cfg(),
        "moh_vit_base_patch16_224": _cfg(),
    }
)


@register_model
def moh_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """MoH ViT-S/16 (DeiT-Small config: 384 wide, 12 blocks, 6 heads; 2 shared + top-2 of 4 routed heads)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, gate="moh", moh_topk=2, moh_shared_heads=2)
    return _create_gated_vit("moh_vit_small_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def moh_vit_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """MoH ViT-B/16 (DeiT-Base config: 768 wide, 12 blocks, 12 heads; 3 shared + top-6 of 9 routed heads)."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, gate="moh", moh_topk=6, moh_shared_heads=3)
    return _create_gated_vit("moh_vit_base_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))
