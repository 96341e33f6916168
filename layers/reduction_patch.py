"""Token reduction for timm ``VisionTransformer`` models: :func:`apply_token_reduction` / :func:`remove_token_reduction`
with ToMe (``"tome"``), PPT (``"ppt"``) or Token Pooling (``"token_pooling"``); :func:`apply_token_merging` is the ToMe
shortcut.

The patch swaps the model's class for a subclass whose block loop reduces tokens (:class:`TokenReductionMixin`); the
blocks, their parameters and the state-dict keys stay as they are. One loop serves every method through a small
per-method reducer (:class:`~attnzoo.layers.TokenReducer`): protected prefix tokens, size tracking, proportional
attention and token maps are shared. A block that reduces nothing runs its own ``forward`` (with the ``log(size)``
proportional-attention mask once tokens carry sizes), so a keep-everything schedule is exactly the unpatched model. A
reducing block is evaluated from its own sub-modules in the pre-norm order ``x + drop_path(ls1(attn(norm1(x))))``,
[reduce], ``x + drop_path(ls2(mlp(norm2(x))))``, [reduce] (ToMe and PPT reduce after the attention, Token Pooling after
the MLP), its attention through attnzoo's attention core (:meth:`attnzoo.layers.Attention._attend`, which also returns
the keys): ``q_norm``/``k_norm`` (qk-norm models), the attention ``norm`` (scale-norm), output gates and LayerScale are
all honoured. Supported blocks are timm's ``Block`` and attnzoo's ``TransformerBlock`` (without conditional position
encoding), each with timm's or attnzoo's ``Attention`` (or a subclass that keeps its ``forward``, e.g. the gated ViT's
attention); anything else raises ``TypeError`` instead of silently computing something different.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn as nn
from timm.layers import Attention as TimmAttention
from timm.models import checkpoint
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import VisionTransformer

from .attention import Attention
from .block import TransformerBlock
from .ppt import PPTReducer
from .token_merging import ToMeReducer, proportional_attention_mask
from .token_pooling import TokenPoolingReducer
from .token_reduction import BlockAttention, TokenReducer, compose_token_map, restore_tokens, store_pruned_tokens
from .vit_intermediates import vit_forward_intermediates
from .vit_pool import ZooVisionTransformer

__all__ = [
    "REDUCTION_METHODS",
    "MergedTokens",
    "PPTVisionTransformer",
    "ReducedTokens",
    "ToMeVisionTransformer",
    "TokenMergingMixin",
    "TokenPoolingVisionTransformer",
    "TokenReductionMixin",
    "TokenReductionVisionTransformer",
    "apply_token_merging",
    "apply_token_reduction",
    "create_token_reducer",
    "remove_token_merging",
    "remove_token_reduction",
]

REDUCTION_METHODS: dict[str, type[TokenReducer]] = {
    "tome": ToMeReducer,
    "ppt": PPTReducer,
    "token_pooling": TokenPoolingReducer,
}
_BLOCK_TYPES = (TimmBlock, TransformerBlock)
_ATTENTION_FORWARDS = (TimmAttention.forward, Attention.forward)  # classes computing exactly the attention core


def _method_arguments(method: str) -> list[str]:
    return [name for name in inspect.signature(REDUCTION_METHODS[method]).parameters if name != "depth"]


def create_token_reducer(method: str, depth: int, **method_args: Any) -> TokenReducer:
    """The reducer of ``method`` (a key of :data:`REDUCTION_METHODS`) for ``depth`` blocks."""
    if method not in REDUCTION_METHODS:
        raise ValueError(f"method must be one of {sorted(REDUCTION_METHODS)}, got {method!r}")
    unknown = sorted(set(method_args) - set(_method_arguments(method)))
    if unknown:
        raise TypeError(f"method {method!r} takes {_method_arguments(method)}, got unknown {unknown}")
    return REDUCTION_METHODS[method](depth, **method_args)


class ReducedTokens(NamedTuple):
    """Output of :meth:`TokenReductionMixin.forward_reduced`.

    ``tokens`` ``(B, N, C)`` (after the final norm), ``size`` ``(B, N, 1)`` original tokens per token (``None`` when
    nothing was reduced), ``token_map`` ``(B, N_orig)`` the token holding each original token (``-1``: pruned) and
    ``pruned`` ``(B, N_orig, C)`` the normed last values of pruned tokens (``None`` unless the method prunes);
    ``restore_tokens(tokens, token_map, pruned)`` gives the full ``(B, N_orig, C)`` sequence.
    """

    tokens: torch.Tensor
    size: torch.Tensor | None
    token_map: torch.Tensor
    pruned: torch.Tensor | None


MergedTokens = ReducedTokens  # the ToMe-era name


def _block_with_mask(block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    """``block(x, attn_mask=...)`` with positional arguments (for ``checkpoint``)."""
    return block(x, attn_mask=attn_mask)


def _reduce(
    reducer: TokenReducer,
    attention: BlockAttention,
    num_remove: int,
    x: torch.Tensor,
    size: torch.Tensor | None,
    token_map: torch.Tensor | None,
    pruned: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    reduction = reducer.reduce(attention, x, size, num_remove)
    if token_map is not None:
        new_map = compose_token_map(token_map, reduction.assign)
        if reducer.may_prune:
            pruned = store_pruned_tokens(pruned, x, token_map, new_map)
        token_map = new_map
    return reduction.x, reduction.size, token_map, pruned


def _reducing_block(
    block: nn.Module,
    reducer: TokenReducer,
    num_remove: int,
    x: torch.Tensor,
    size: torch.Tensor | None,
    token_map: torch.Tensor | None,
    pruned: torch.Tensor | None,
    prop_attn: bool,
    num_prefix: int,
    has_class_token: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One pre-norm block that removes ``num_remove`` tokens (after its attention or after its MLP); returns the
    tokens, sizes, token map and pruned-token store."""
    mask = proportional_attention_mask(size, x.dtype) if prop_attn and size is not None else None
    attn = block.attn  # attnzoo's or timm's Attention: the attnzoo core runs on both (see Attention._attend)
    normed = block.norm1(x)
    out, keys = Attention._attend(attn, normed, mask)
    x = x + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(out))))
    attention = BlockAttention(attn, normed, keys, mask, size, num_prefix, has_class_token)
    if not reducer.after_mlp:
        x, size, token_map, pruned = _reduce(reducer, attention, num_remove, x, size, token_map, pruned)
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    if reducer.after_mlp:
        x, size, token_map, pruned = _reduce(reducer, attention, num_remove, x, size, token_map, pruned)
    return x, size, token_map, pruned


def _check_supported(model: nn.Module) -> None:
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"token reduction supports timm VisionTransformer models, got {type(model).__name__}")
    for i, block in enumerate(model.blocks):
        if type(block) not in _BLOCK_TYPES:
            raise TypeError(
                f"token reduction supports timm Block and attnzoo TransformerBlock blocks, block {i} is "
                f"{type(block).__name__}"
            )
        if isinstance(block, TransformerBlock) and not isinstance(block.pos_embed, nn.Identity):
            raise TypeError(f"block {i} has a conditional position encoding, which needs a full token map")
        if type(block.attn).forward not in _ATTENTION_FORWARDS:
            raise TypeError(
                f"token reduction supports timm and attnzoo Attention, block {i} has {type(block.attn).__name__}"
            )


class TokenReductionMixin:
    """Token reduction for a ``VisionTransformer`` subclass (put first in the bases).

    ``token_reducer`` is the method's per-block policy (:func:`create_token_reducer`), ``token_prop_attn`` enables
    proportional attention, ``token_trace_source`` makes ``forward_features`` store the last batch's
    ``reduced_token_map`` ``(B, N_orig)`` and ``reduced_size`` (:meth:`forward_reduced` returns them without the side
    effect). ``forward_intermediates`` / ``features_only`` return full-size maps: merged tokens are copied back to
    every position they hold, pruned tokens keep their value from the block that dropped them.

    TorchScript is not supported (``supports_torchscript = False``): the reduced forward evaluates blocks of several
    classes from one function that takes the block as an argument, which TorchScript cannot compile. Use
    ``torch.compile`` (the token counts are static, so it traces without graph breaks).
    """

    supports_torchscript = False
    token_reducer: TokenReducer
    token_prop_attn: bool
    token_trace_source: bool

    def set_token_reduction(
        self, method: str = "tome", prop_attn: bool = True, trace_source: bool = False, **method_args: Any
    ) -> None:
        """Set the method (``"tome"``, ``"ppt"``, ``"token_pooling"``), its arguments and the shared options."""
        self.token_reducer = create_token_reducer(method, len(self.blocks), **method_args)
        self.token_prop_attn = bool(prop_attn)
        self.token_trace_source = bool(trace_source)

    def _check_no_mask(self, attn_mask: torch.Tensor | None, is_causal: bool) -> bool:
        """True when a caller's mask is given (only allowed while nothing is reduced)."""
        if attn_mask is None and not is_causal:
            return False
        if not self.token_reducer.is_identity():
            raise ValueError("attn_mask / is_causal cannot be combined with token reduction")
        return True

    def _reduce_blocks(
        self, x: torch.Tensor, blocks: nn.Module, take_indices: Sequence[int], track: bool, norm: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, list[torch.Tensor]]:
        """Run ``blocks`` on ``x`` ``(B, N, C)``, reducing by the schedule; returns the tokens, their sizes, the token
        map and pruned-token store (when ``track``) and the full ``(B, N, C)`` outputs of the blocks in
        ``take_indices``."""
        B, N = x.shape[:2]
        npt, has_class_token = self.num_prefix_tokens, self.cls_token is not None
        size = pruned = None
        token_map = torch.arange(N, device=x.device).expand(B, -1) if track else None
        use_checkpoint = self.grad_checkpointing and not torch.jit.is_scripting()
        intermediates = []
        for i, block in enumerate(blocks):
            num_remove = self.token_reducer.tokens_removed(i, x.shape[1], npt)
            if num_remove > 0:
                args = (block, self.token_reducer, num_remove, x, size, token_map, pruned)
                args += (self.token_prop_attn, npt, has_class_token)
                x, size, token_map, pruned = (
                    checkpoint(_reducing_block, *args) if use_checkpoint else _reducing_block(*args)
                )
            elif size is not None and self.token_prop_attn:
                mask = proportional_attention_mask(size, x.dtype)
                x = checkpoint(_block_with_mask, block, x, mask) if use_checkpoint else block(x, attn_mask=mask)
            else:
                x = checkpoint(block, x) if use_checkpoint else block(x)
            if i in take_indices:
                y = restore_tokens(x, token_map, pruned) if token_map is not None else x
                intermediates.append(self.norm(y) if norm else y)
        return x, size, token_map, pruned, intermediates

    def forward_reduced(self, x: torch.Tensor) -> ReducedTokens:
        """Image ``(B, in_chans, H, W)`` -> the reduced, normed tokens with their sizes, token map and pruned tokens."""
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        x, size, token_map, pruned, _ = self._reduce_blocks(x, self.blocks, (), track=True)
        return ReducedTokens(self.norm(x), size, token_map, self.norm(pruned) if pruned is not None else None)

    def forward_features(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        """Image -> reduced tokens ``(B, N_reduced, C)`` after the final norm."""
        if self._check_no_mask(attn_mask, is_causal):
            return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        x, size, token_map, _, _ = self._reduce_blocks(x, self.blocks, (), track=self.token_trace_source)
        if self.token_trace_source:
            self.reduced_token_map, self.reduced_size = token_map, size
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
        """timm's ``forward_intermediates`` with reduction; the intermediates are restored to the full token map
        (``NCHW`` maps or ``NLC`` patch tokens), so reduced ViTs feed dense-prediction heads unchanged."""
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
            x, _, _, _, intermediates = self._reduce_blocks(x, blocks, take_indices, track=True, norm=norm)
            return x, intermediates

        return vit_forward_intermediates(self, x, loop, indices, **options)


TokenMergingMixin = TokenReductionMixin  # the ToMe-era name


class TokenReductionVisionTransformer(TokenReductionMixin, ZooVisionTransformer):
    """timm's ``VisionTransformer`` with token reduction (same parameters and checkpoints; the zoo's attention-pool
    heads, :class:`~attnzoo.layers.ZooVisionTransformer`).

    The subclasses fix ``method``; their keyword arguments are the method's (see the reducers: ToMe ``r``; PPT ``r``,
    ``locations``, ``threshold``; Token Pooling ``keep_ratio``, ``num_clusters``, ``locations``, ``iterations``,
    ``weighted``, ``center``), ``prop_attn``, ``trace_source`` and the ``VisionTransformer`` arguments.
    """

    method: ClassVar[str] = "tome"

    def __init__(self, prop_attn: bool = True, trace_source: bool = False, **kwargs: Any) -> None:
        method_args = {name: kwargs.pop(name) for name in _method_arguments(self.method) if name in kwargs}
        super().__init__(**kwargs)
        _check_supported(self)
        self.set_token_reduction(self.method, prop_attn=prop_attn, trace_source=trace_source, **method_args)


class ToMeVisionTransformer(TokenReductionVisionTransformer):
    """ViT merging ``r`` tokens per block (:class:`~attnzoo.layers.ToMeReducer`)."""

    method = "tome"


class PPTVisionTransformer(TokenReductionVisionTransformer):
    """ViT with PPT's adaptive pruning / pooling (:class:`~attnzoo.layers.PPTReducer`)."""

    method = "ppt"


class TokenPoolingVisionTransformer(TokenReductionVisionTransformer):
    """ViT with Token Pooling (:class:`~attnzoo.layers.TokenPoolingReducer`)."""

    method = "token_pooling"


_REDUCTION_CLASSES: dict[type, type] = {ZooVisionTransformer: TokenReductionVisionTransformer}


def _reduction_class(base: type) -> type:
    if base not in _REDUCTION_CLASSES:
        name = f"TokenReduction{base.__name__}"
        _REDUCTION_CLASSES[base] = type(name, (TokenReductionMixin, base), {"__module__": __name__})
    return _REDUCTION_CLASSES[base]


def apply_token_reduction(
    model: nn.Module, method: str = "tome", prop_attn: bool = True, trace_source: bool = False, **method_args: Any
) -> nn.Module:
    """Patch ``model`` (a timm ``VisionTransformer``, incl. subclasses, e.g. DeiT / DeiT-III / gated ViT) in place to
    reduce tokens with ``method``; returns ``model``. Applying again replaces the method and its schedule.

    Args:
        method: ``"tome"`` (:class:`~attnzoo.layers.ToMeReducer`: ``r``), ``"ppt"``
            (:class:`~attnzoo.layers.PPTReducer`: ``r``, ``locations``, ``threshold``) or ``"token_pooling"``
            (:class:`~attnzoo.layers.TokenPoolingReducer`: ``keep_ratio`` / ``num_clusters``, ``locations``,
            ``iterations``, ``weighted``, ``center``).
        prop_attn: proportional attention (``softmax(q k^T / sqrt(d) + log size)``).
        trace_source: record the token map and sizes of each ``forward_features`` call as
            ``model.reduced_token_map`` / ``model.reduced_size``.
        **method_args: the method's arguments (defaults: the papers' DeiT-S settings).
    """
    patched = isinstance(model, TokenReductionMixin)
    if not patched:
        _check_supported(model)
    reducer = create_token_reducer(method, len(model.blocks), **method_args)  # bad arguments leave the model as is
    if not patched:
        model.__class__ = _reduction_class(type(model))
    model.token_reducer = reducer
    model.token_prop_attn, model.token_trace_source = bool(prop_attn), bool(trace_source)
    return model


def remove_token_reduction(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_token_reduction` in place (a model without reduction is returned unchanged)."""
    if isinstance(model, TokenReductionMixin):
        model.__class__ = next(c for c in type(model).__mro__[1:] if not issubclass(c, TokenReductionMixin))
        for name in ("token_reducer", "token_prop_attn", "token_trace_source", "reduced_token_map", "reduced_size"):
            model.__dict__.pop(name, None)
    return model


def apply_token_merging(
    model: nn.Module,
    r: int | Sequence[int] | tuple[int, float] = 16,
    prop_attn: bool = True,
    trace_source: bool = False,
) -> nn.Module:
    """ToMe: :func:`apply_token_reduction` with ``method="tome"``, merging ``r`` tokens per block (an int, a per-block
    list or ``(r, inflection)``, see :func:`~attnzoo.layers.merge_schedule`); ``r=0`` is exactly the plain model."""
    return apply_token_reduction(model, "tome", prop_attn=prop_attn, trace_source=trace_source, r=r)


remove_token_merging = remove_token_reduction
