"""PPMA (Zhao et al., NeurIPS 2025, "Polyline Path Masked Attention for Vision Transformer").

RMT's network (:class:`attnzoo.rmt.RMT`: deep conv stem, DWConv position encoding, DWConv FFN, projection head) with
polyline path masked attention in every block (:class:`attnzoo.layers.PolylineAttention`): Mamba2's structured mask
along an L-shaped (horizontal-then-vertical) path between query and key, with per-token decays predicted from the
block input; decomposed along rows and columns in the early stages, the full 2-D mask in the later ones. Configs of
``PPMA:classification/models/PPMA.py`` (``PPMAViT_T/S/B``); the official checkpoints (Hugging Face Hub
``ZhongchenZhao/PPMA``, ``best.pth`` training pickles) load through :func:`attnzoo.rmt.checkpoint_filter_fn`.
"""

from __future__ import annotations

from timm.models import generate_default_cfgs, register_model

from .rmt import RMT, RMT_BASE, RMT_SMALL, RMT_TINY, _cfg, checkpoint_filter_fn, create_rmt

__all__ = ["checkpoint_filter_fn"]  # the family's filter (RMT's), found by attnzoo.weights.downstream

_URL = "https://huggingface.co/ZhongchenZhao/PPMA/resolve/main/checkpoints/classification/{}/best.pth"
_PPMA = dict(
    license="apache-2.0",
    paper_ids="arXiv:2506.15940",
    paper_name="Polyline Path Masked Attention for Vision Transformer",
    origin_url="https://github.com/zhongchenzhao/PPMA",
    notes=(
        "best.pth is the DeiT-style training checkpoint of the epoch with the best EMA accuracy; its raw weights "
        "('models') load, not the 'model_ema' copy the published top-1 was measured on (within 0.1 top-1 of each "
        "other in the official training logs)",
    ),
)

default_cfgs = generate_default_cfgs(
    {
        "ppma_tiny.in1k": _cfg(url=_URL.format("PPMA_T_202502251000"), **_PPMA),
        "ppma_small.in1k": _cfg(url=_URL.format("PPMA_S_202504021000"), **_PPMA),
        "ppma_base.in1k": _cfg(url=_URL.format("PPMA_B_202504101400"), **_PPMA),
    }
)


def _polyline(config: dict) -> dict:
    """An RMT config with polyline attention (the Manhattan decay settings do not apply)."""
    return {k: v for k, v in config.items() if k != "heads_ranges"} | {"mixer": "polyline"}


@register_model
def ppma_tiny(pretrained: bool = False, **kwargs) -> RMT:
    """PPMA-T: RMT-T with polyline path masked attention (14.34M params)."""
    return create_rmt("ppma_tiny", pretrained=pretrained, **{**_polyline(RMT_TINY), **kwargs})


@register_model
def ppma_small(pretrained: bool = False, **kwargs) -> RMT:
    """PPMA-S: RMT-S with polyline path masked attention (26.97M params)."""
    return create_rmt("ppma_small", pretrained=pretrained, **{**_polyline(RMT_SMALL), **kwargs})


@register_model
def ppma_base(pretrained: bool = False, **kwargs) -> RMT:
    """PPMA-B: RMT-B with polyline path masked attention (54.16M params)."""
    return create_rmt("ppma_base", pretrained=pretrained, **{**_polyline(RMT_BASE), **kwargs})
