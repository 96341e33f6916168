"""PPT ViTs (Wu et al., "PPT: Token Pruning and Pooling for Efficient Vision Transformers", arXiv:2310.01812) on
timm's DeiT weights.

The model is timm's DeiT with :class:`attnzoo.layers.PPTVisionTransformer` (same parameters, same keys), so its
pretrained cfg is timm's own entry with the PPT paper added: ``pretrained=True`` loads timm's checkpoint and prunes /
pools off the shelf with the official DeiT-S setting (``r=50`` tokens at blocks 3, 6, 9, ``threshold=7e-5``: 2.94
GMACs, 79.50 top-1 without fine-tuning per the official README). ``r``, ``locations``, ``threshold``, ``prop_attn``
and ``trace_source`` are model arguments; ``r=0`` is exactly the plain model. For any other timm ``VisionTransformer``
use ``attnzoo.apply_token_reduction(model, "ppt")``.
"""

from __future__ import annotations

from timm.models import generate_default_cfgs, register_model

from attnzoo.layers import PPTVisionTransformer

from ._reduction_cfg import create_reducing_vit, timm_weights_cfg

__all__: list[str] = []

PPT_PAPER = {
    "paper_ids": ["arXiv:2310.01812"],
    "paper_name": "PPT: Token Pruning and Pooling for Efficient Vision Transformers",
    "origin_url": "https://arxiv.org/abs/2310.01812",
}
DEIT = "arXiv:2012.12877"

default_cfgs = generate_default_cfgs(
    {
        "ppt_deit_small_patch16_224.fb_in1k": timm_weights_cfg(
            "deit_small_patch16_224.fb_in1k",
            PPT_PAPER,
            "PPT r=50 at blocks 3, 6, 9, threshold 7e-5 (official README: 79.50 top-1 off the shelf, 2.94 GMACs)",
            [DEIT],
        ),
    }
)


@register_model
def ppt_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> PPTVisionTransformer:
    """DeiT-S/16 with PPT: 50 tokens pruned or pooled at blocks 3, 6, 9 (197 -> 49 tokens, 2.94 GMACs)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, r=50, threshold=7e-5)  # blocks 3, 6, 9
    return create_reducing_vit(
        PPTVisionTransformer, "ppt_deit_small_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs)
    )
