"""Token merging for timm ``VisionTransformer`` models: :func:`apply_token_merging` / :func:`remove_token_merging`.

The patch swaps the model's class for a subclass whose block loop merges tokens (:class:`TokenMergingMixin`); the
blocks, their parameters and the state-dict keys stay as they are. A block that merges nothing runs its own
``forward`` (with the ``log(size)`` proportional-attention mask once tokens carry sizes), so a zero schedule is exactly
the unpatched model. A merging block is evaluated from its own sub-modules in the pre-norm order
``x + drop_path(ls1(attn(norm1(x))))``, merge, ``x + drop_path(ls2(mlp(norm2(x))))``, its attention through attnzoo's
attention core (:meth:`attnzoo.layers.Attention._attend`, which also returns the keys ToMe matches on):
``q_norm``/``k_norm`` (qk-norm models), the attention ``norm`` (scale-norm), output gates and LayerScale are all
honoured. Supported blocks are timm's ``Block`` and attnzoo's ``TransformerBlock`` (without conditional position
encoding), each with timm's or attnzoo's ``Attention`` (or a subclass that keeps its ``forward``, e.g. the gated ViT's
attention); anything else raises ``TypeError`` instead of silently computing something different.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn as nn
from timm.layers import Attention as TimmAttention
from timm.models import checkpoint
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import VisionTransformer

from .attention import Attention
from .block import TransformerBlock
from .token_merging import (
    bipartite_soft_matching,
    merge_schedule,
    merge_token_map,
    merge_tokens,
    proportional_attention_mask,
    unmerge_tokens,
)
from .vit_intermediates import vit_forward_intermediates

__all__ = [
    "MergedTokens",
    "ToMeVisionTransformer",
    "TokenMergingMixin",
    "apply_token_merging",
    "remove_token_merging",
]

_BLOCK_TYPES = (TimmBlock, TransformerBlock)
_ATTENTION_FORWARDS = (TimmAttention.forward, Attention.forward)  # classes computing exactly the attention core


class MergedTokens(NamedTuple):
    """Output of :meth:`TokenMergingMixin.forward_merged`.

    ``tokens`` ``(B, N, C)`` (after the final norm), ``size`` ``(B, N, 1)`` original tokens per token (``None`` when
    nothing merged) and ``token_map`` ``(B, N_orig)`` the token holding each original token; ``unmerge_tokens(tokens,
    token_map)`` gives the full ``(B, N_orig, C)`` sequence.
    """

    tokens: torch.Tensor
    size: torch.Tensor | None
    token_map: torch.Tensor


def _block_with_mask(block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    """``block(x, attn_mask=...)`` with positional arguments (for ``checkpoint``)."""
    return block(x, attn_mask=attn_mask)


def _merging_block(
    block: nn.Module,
    x: torch.Tensor,
    size: torch.Tensor | None,
    token_map: torch.Tensor | None,
    r: int,
    prop_attn: bool,
    num_prefix: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One pre-norm block that merges ``r`` tokens between its attention and its MLP."""
    mask = proportional_attention_mask(size, x.dtype) if prop_attn and size is not None else None
    attn = block.attn  # attnzoo's or timm's Attention: the attnzoo core runs on both (see Attention._attend)
    out, keys = Attention._attend(attn, block.norm1(x), mask)
    x = x + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(out))))
    plan = bipartite_soft_matching(keys.mean(dim=1), r, num_prefix)
    if token_map is not None:
        token_map = merge_token_map(token_map, plan, x.shape[1])
    x, size = merge_tokens(x, plan, size)
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, size, token_map


def _check_supported(model: nn.Module) -> None:
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"token merging supports timm VisionTransformer models, got {type(model).__name__}")
    for i, block in enumerate(model.blocks):
        if type(block) not in _BLOCK_TYPES:
            raise TypeError(
                f"token merging supports timm Block and attnzoo TransformerBlock blocks, block {i} is "
                f"{type(block).__name__}"
            )
        if isinstance(block, TransformerBlock) and not isinstance(block.pos_embed, nn.Identity):
            raise TypeError(f"block {i} has a conditional position encoding, which needs a full token map")
        if type(block.attn).forward not in _ATTENTION_FORWARDS:
            raise TypeError(
                f"token merging supports timm and attnzoo Attention, block {i} has {type(block.attn).__name__}"
            )


class TokenMergingMixin:
    """Token merging for a ``VisionTransformer`` subclass (put first in the bases).

    ``tome_r`` holds the tokens merged per block (from :func:`~attnzoo.layers.merge_schedule`), ``tome_prop_attn``
    enables proportional attention, ``tome_trace_source`` makes ``forward_features`` store the last batch's
    ``tome_token_map`` ``(B, N_orig)`` and ``tome_size`` (:meth:`forward_merged` returns them without the side
    effect; :func:`~attnzoo.layers.token_map_to_source` gives the paper's dense source matrix).
    ``forward_intermediates`` / ``features_only`` return unmerged, full-size maps.

    TorchScript is not supported (``supports_torchscript = False``): the merged forward evaluates blocks of several
    classes from one function that takes the block as an argument, which TorchScript cannot compile. Use
    ``torch.compile`` (the token counts are static, so it traces without graph breaks).
    """

    supports_torchscript = False
    tome_r: list[int]
    tome_prop_attn: bool
    tome_trace_source: bool

    def set_token_merging(
        self, r: int | Sequence[int] | tuple[int, float] = 0, prop_attn: bool = True, trace_source: bool = False
    ) -> None:
        """Set the merge schedule (see :func:`~attnzoo.layers.merge_schedule`) and options."""
        self.tome_r = merge_schedule(r, len(self.blocks))
        self.tome_prop_attn = bool(prop_attn)
        self.tome_trace_source = bool(trace_source)

    def _check_no_mask(self, attn_mask: torch.Tensor | None, is_causal: bool) -> bool:
        """True when a caller's mask is given (only allowed while nothing is merged)."""
        if attn_mask is None and not is_causal:
            return False
        if any(self.tome_r):
            raise ValueError("attn_mask / is_causal cannot be combined with token merging (r > 0)")
        return True

    def _merge_blocks(
        self, x: torch.Tensor, blocks: nn.Module, take_indices: Sequence[int], track: bool, norm: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, list[torch.Tensor]]:
        """Run ``blocks`` on ``x`` ``(B, N, C)``, merging by the schedule; returns the tokens, their sizes, the token
        map (when ``track``) and the unmerged ``(B, N, C)`` outputs of the blocks in ``take_indices``."""
        B, N = x.shape[:2]
        size: torch.Tensor | None = None
        token_map = torch.arange(N, device=x.device).expand(B, -1) if track else None
        use_checkpoint = self.grad_checkpointing and not torch.jit.is_scripting()
        intermediates = []
        for i, block in enumerate(blocks):
            r = min(self.tome_r[i], (x.shape[1] - self.num_prefix_tokens) // 2)
            if r > 0:
                args = (block, x, size, token_map, r, self.tome_prop_attn, self.num_prefix_tokens)
                x, size, token_map = checkpoint(_merging_block, *args) if use_checkpoint else _merging_block(*args)
            elif size is not None and self.tome_prop_attn:
                mask = proportional_attention_mask(size, x.dtype)
                x = checkpoint(_block_with_mask, block, x, mask) if use_checkpoint else block(x, attn_mask=mask)
            else:
                x = checkpoint(block, x) if use_checkpoint else block(x)
            if i in take_indices:
                y = self.norm(x) if norm else x
                intermediates.append(unmerge_tokens(y, token_map) if token_map is not None else y)
        return x, size, token_map, intermediates

    def forward_merged(self, x: torch.Tensor) -> MergedTokens:
        """Image ``(B, in_chans, H, W)`` -> the merged, normed tokens with their sizes and token map."""
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        x, size, token_map, _ = self._merge_blocks(x, self.blocks, (), track=True)
        return MergedTokens(self.norm(x), size, token_map)

    def forward_features(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        """Image -> merged tokens ``(B, N - sum(r), C)`` after the final norm."""
        if self._check_no_mask(attn_mask, is_causal):
            return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        x, size, token_map, _ = self._merge_blocks(x, self.blocks, (), track=self.tome_trace_source)
        if self.tome_trace_source:
            self.tome_token_map, self.tome_size = token_map, size
        return self.norm(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]] | dict[str, Any]:
        """timm's ``forward_intermediates`` with merging; the intermediates are unmerged to the full token map
        (``NCHW`` maps or ``NLC`` patch tokens), so merged ViTs feed dense-prediction heads unchanged."""
        options = dict(
            return_prefix_tokens=return_prefix_tokens,
            norm=norm,
            stop_early=stop_early,
            output_fmt=output_fmt,
            intermediates_only=intermediates_only,
            output_dict=output_dict,
        )
        if self._check_no_mask(attn_mask, is_causal):
            return super().forward_intermediates(x, indices, attn_mask=attn_mask, is_causal=is_causal, **options)

        def loop(x, blocks, take_indices, norm, grid):
            x, _, _, intermediates = self._merge_blocks(x, blocks, take_indices, track=True, norm=norm)
            return x, intermediates

        return vit_forward_intermediates(self, x, loop, indices, **options)


class ToMeVisionTransformer(TokenMergingMixin, VisionTransformer):
    """timm's ``VisionTransformer`` with token merging (same parameters and checkpoints).

    Args:
        r: tokens merged per block: an int, a per-block list or ``(r, inflection)`` (see
            :func:`~attnzoo.layers.merge_schedule`).
        prop_attn: proportional attention (``log(size)`` added to the attention logits).
        trace_source: store the last ``forward_features`` call's token map and sizes on the model.
        **kwargs: ``VisionTransformer`` arguments.
    """

    def __init__(
        self,
        r: int | Sequence[int] | tuple[int, float] = 0,
        prop_attn: bool = True,
        trace_source: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        _check_supported(self)
        self.set_token_merging(r, prop_attn=prop_attn, trace_source=trace_source)


_MERGING_CLASSES: dict[type, type] = {VisionTransformer: ToMeVisionTransformer}


def _merging_class(base: type) -> type:
    if base not in _MERGING_CLASSES:
        _MERGING_CLASSES[base] = type(f"ToMe{base.__name__}", (TokenMergingMixin, base), {"__module__": __name__})
    return _MERGING_CLASSES[base]


def apply_token_merging(
    model: nn.Module,
    r: int | Sequence[int] | tuple[int, float] = 16,
    prop_attn: bool = True,
    trace_source: bool = False,
) -> nn.Module:
    """Patch ``model`` (a timm ``VisionTransformer``, incl. subclasses, e.g. DeiT / DeiT-III / gated ViT) in place to
    merge ``r`` tokens per block; returns ``model``. ``r=0`` gives exactly the unpatched outputs; applying again
    replaces the schedule.

    Args:
        r: an int, a per-block list or ``(r, inflection)`` (see :func:`~attnzoo.layers.merge_schedule`).
        prop_attn: proportional attention (``softmax(q k^T / sqrt(d) + log size)``).
        trace_source: record the token map (and sizes) of each ``forward_features`` call as ``model.tome_token_map``.
    """
    if not isinstance(model, TokenMergingMixin):
        _check_supported(model)
        model.__class__ = _merging_class(type(model))
    model.set_token_merging(r, prop_attn=prop_attn, trace_source=trace_source)
    return model


def remove_token_merging(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_token_merging` in place (a model without merging is returned unchanged)."""
    if isinstance(model, TokenMergingMixin):
        model.__class__ = next(c for c in type(model).__mro__[1:] if not issubclass(c, TokenMergingMixin))
        for name in ("tome_r", "tome_prop_attn", "tome_trace_source", "tome_token_map", "tome_size"):
            model.__dict__.pop(name, None)
    return model
