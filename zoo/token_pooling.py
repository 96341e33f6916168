"""Token Pooling ViTs (Marin et al., "Token Pooling in Vision Transformers", arXiv:2110.03860) on timm's DeiT weights.

The model is timm's DeiT with :class:`attnzoo.layers.TokenPoolingVisionTransformer` (same parameters, same keys), so
its pretrained cfg is timm's own entry with the Token Pooling paper added: ``pretrained=True`` loads timm's checkpoint
and pools off the shelf (the paper fine-tunes; its accuracies need fine-tuning). Default schedule: keep 60% of the
patch tokens after blocks 3, 6 and 9 (196 -> 118 -> 71 -> 43 patch tokens, 2.89 GMACs, the budget of PPT's DeiT-S
setting), weighted K-medoids with 5 iterations. ``keep_ratio`` / ``num_clusters``, ``locations``, ``iterations``,
``weighted``, ``center``, ``prop_attn`` and ``trace_source`` are model arguments; ``keep_ratio=1.0`` is exactly the
plain model. For any other timm ``VisionTransformer`` use ``attnzoo.apply_token_reduction(model, "token_pooling")``.
"""

from __future__ import annotations

from timm.models import generate_default_cfgs, register_model

from attnzoo.layers import TokenPoolingVisionTransformer

from ._reduction_cfg import create_reducing_vit, timm_weights_cfg

__all__: list[str] = []

TOKEN_POOLING_PAPER = {
    "paper_ids": ["arXiv:2110.03860"],
    "paper_name": "Token Pooling in Vision Transformers",
    "origin_url": "https://arxiv.org/abs/2110.03860",
}
DEIT = "arXiv:2012.12877"

default_cfgs = generate_default_cfgs(
    {
        "tokenpool_deit_small_patch16_224.fb_in1k": timm_weights_cfg(
            "deit_small_patch16_224.fb_in1k",
            TOKEN_POOLING_PAPER,
            "Token Pooling keeping 60% of the patch tokens after blocks 3, 6, 9 (2.89 GMACs), not fine-tuned",
            [DEIT],
        ),
    }
)


@register_model
def tokenpool_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> TokenPoolingVisionTransformer:
    """DeiT-S/16 with Token Pooling: 60% of the patch tokens kept after blocks 3, 6, 9 (197 -> 44 tokens)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, keep_ratio=0.6)  # after blocks 3, 6, 9
    if kwargs.get("num_clusters") is not None:  # explicit cluster counts replace the default ratio
        model_args.pop("keep_ratio")
    return create_reducing_vit(
        TokenPoolingVisionTransformer,
        "tokenpool_deit_small_patch16_224",
        pretrained=pretrained,
        **dict(model_args, **kwargs),
    )
