"""What token-reduction methods share: the reducer interface, the attention a reducer reads, and token maps.

A *reducer* (:class:`TokenReducer`) is one method's per-block policy: how many tokens a block removes (a static
Python int, so reduced models trace with ``torch.compile`` without graph breaks) and how (:meth:`TokenReducer.reduce`).
The block loop that runs it (:class:`~attnzoo.layers.TokenReductionMixin`) is shared by every method: protected
prefix tokens (class / register / distillation), size tracking, proportional attention and token maps.

Every reduction returns an *assignment* ``(B, N_in)``: the output token that holds each input token, ``-1`` when the
input token was pruned (dropped). Composing assignments gives the *token map* ``(B, N_orig)`` of each original token;
pruned tokens keep the value they had when they were dropped, so :func:`restore_tokens` rebuilds a full-size sequence
(for ``forward_intermediates`` / ``features_only``) from any reduced one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "BlockAttention",
    "Reduction",
    "TokenReducer",
    "compose_token_map",
    "per_location",
    "reduction_locations",
    "restore_tokens",
    "store_pruned_tokens",
]


class Reduction(NamedTuple):
    """One block's reduction: ``x`` ``(B, N_out, C)``, ``size`` ``(B, N_out, 1)`` original tokens per token and
    ``assign`` ``(B, N_in)`` int64, the output token holding each input token (``-1``: pruned). The first
    ``num_prefix`` tokens stay first and unchanged."""

    x: torch.Tensor
    size: torch.Tensor
    assign: torch.Tensor


class BlockAttention:
    """The attention of the block a reducer works in, as that block computed it.

    ``attn`` is the block's attention module (timm's or attnzoo's ``Attention``), ``normed`` ``(B, N, C)`` its input
    (after ``norm1``), ``keys`` ``(B, heads, N, head_dim)`` its keys (after ``k_norm``), ``mask`` the additive
    proportional-attention mask ``(B, 1, 1, N)`` it used (``None`` without) and ``size`` ``(B, N, 1)`` the token
    sizes (``None``: all one). Probabilities are recomputed from the block's own queries, so they are exactly the
    softmax the block applied (``qk_norm`` and ``log(size)`` included).
    """

    def __init__(
        self,
        attn: nn.Module,
        normed: torch.Tensor,
        keys: torch.Tensor,
        mask: torch.Tensor | None,
        size: torch.Tensor | None,
        num_prefix: int,
        has_class_token: bool,
    ) -> None:
        self.attn, self.normed, self.keys, self.mask, self.size = attn, normed, keys, mask, size
        self.num_prefix, self.has_class_token = num_prefix, has_class_token

    def metric(self) -> torch.Tensor:
        """Head-averaged keys ``(B, N, head_dim)`` (ToMe's similarity metric)."""
        return self.keys.mean(dim=1)

    def probabilities(self, stop: int | None = None) -> torch.Tensor:
        """Attention probabilities ``(B, heads, Q, N)`` of the first ``stop`` queries (``None``: all); no gradient
        (reducers only rank and compare them)."""
        attn, x = self.attn, self.normed[:, :stop]
        B, Q, _ = x.shape
        with torch.no_grad():
            bias = attn.qkv.bias[: attn.attn_dim] if attn.qkv.bias is not None else None
            q = F.linear(x, attn.qkv.weight[: attn.attn_dim], bias)
            q = attn.q_norm(q.view(B, Q, attn.num_heads, attn.head_dim).transpose(1, 2))
            logits = (q @ self.keys.transpose(-2, -1)) * attn.head_dim**-0.5  # SDPA's default scale
            if self.mask is not None:
                logits = logits + self.mask
            return logits.softmax(dim=-1)

    def class_attention(self) -> torch.Tensor:
        """The class token's attention row averaged over heads, ``(B, N)``."""
        return self.probabilities(1).mean(dim=1)[:, 0]

    def attention_received(self) -> torch.Tensor:
        """Attention each token receives, averaged over heads and over the queries weighted by their sizes,
        ``(B, N)`` (sums to one; PoWER-BERT's significance score up to a constant)."""
        received = self.probabilities().mean(dim=1)  # (B, Q, N)
        if self.size is None:
            return received.mean(dim=1)
        return (received * self.size).sum(dim=1) / self.size.sum(dim=1)

    def importance(self) -> torch.Tensor:
        """Each token's weight in the model's pooled output ``(B, N)``: the class-attention row with a class token,
        otherwise the attention received (an average-pooled output is exactly that mixture of the values)."""
        return self.class_attention() if self.has_class_token else self.attention_received()


class TokenReducer:
    """One token-reduction method's per-block policy (subclasses: ToMe, PPT, Token Pooling).

    ``after_mlp``: the reduction runs on the block output (else between the attention and the MLP); ``may_prune``:
    some tokens can be dropped (``assign == -1``), so full-size maps keep their last values.
    """

    name: ClassVar[str]
    after_mlp: ClassVar[bool] = False
    may_prune: ClassVar[bool] = False

    def tokens_removed(self, index: int, num_tokens: int, num_prefix: int) -> int:
        """Tokens block ``index`` removes from ``num_tokens`` (``num_prefix`` of them protected); 0: the block runs
        unchanged. Raises ``ValueError`` when the schedule cannot be met."""
        raise NotImplementedError

    def reduce(
        self, attention: BlockAttention, x: torch.Tensor, size: torch.Tensor | None, num_remove: int
    ) -> Reduction:
        """Remove ``num_remove`` tokens from ``x`` ``(B, N, C)`` (sizes ``(B, N, 1)`` or ``None``: all one)."""
        raise NotImplementedError

    def is_identity(self) -> bool:
        """True when no block removes anything (the model computes exactly the plain forward)."""
        raise NotImplementedError


def compose_token_map(token_map: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """Follow one reduction: ``token_map`` ``(B, N_orig)`` indexes the tokens before it (``-1``: pruned), the result
    indexes the tokens after it."""
    followed = assign.gather(1, token_map.clamp(min=0))
    return torch.where(token_map >= 0, followed, -1)


def store_pruned_tokens(
    pruned: torch.Tensor | None, x: torch.Tensor, token_map: torch.Tensor, new_map: torch.Tensor
) -> torch.Tensor:
    """``pruned`` ``(B, N_orig, C)`` with the original tokens that ``x`` ``(B, N, C)`` held under ``token_map`` and
    lose under ``new_map`` set to their values in ``x`` (``None``: start from zeros)."""
    if pruned is None:
        pruned = x.new_zeros(token_map.shape[0], token_map.shape[1], x.shape[-1])
    dropped = ((new_map < 0) & (token_map >= 0)).unsqueeze(-1)
    held = x.gather(1, token_map.clamp(min=0).unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return torch.where(dropped, held, pruned)


def restore_tokens(x: torch.Tensor, token_map: torch.Tensor, pruned: torch.Tensor | None = None) -> torch.Tensor:
    """The full ``(B, N_orig, C)`` sequence of a reduced ``x`` ``(B, N, C)``: every original token gets the value of
    the token holding it, or its stored value in ``pruned`` ``(B, N_orig, C)`` when it was dropped."""
    full = x.gather(1, token_map.clamp(min=0).unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    if pruned is None:
        return full
    return torch.where((token_map < 0).unsqueeze(-1), pruned, full)


def reduction_locations(locations: Sequence[int] | None, depth: int, name: str = "locations") -> list[int]:
    """Validated, sorted 0-based block indices; ``None``: the literature's DeiT choice (blocks 3, 6, 9 of 12, as in
    PPT and EViT) scaled to ``depth``, i.e. ``depth * k // 4`` for ``k = 1, 2, 3``."""
    if locations is None:
        return sorted({depth * k // 4 for k in (1, 2, 3)} & set(range(depth)))
    locations = list(locations)
    if any(isinstance(i, bool) or not isinstance(i, int) for i in locations):
        raise TypeError(f"{name} must be block indices (ints), got {locations!r}")
    if len(set(locations)) != len(locations) or any(not 0 <= i < depth for i in locations):
        raise ValueError(f"{name} must be distinct block indices in [0, {depth - 1}], got {locations}")
    return sorted(locations)


def per_location(value: int | Sequence[int], locations: list[int], name: str) -> list[int]:
    """``value`` (an int, or one int per location) as one non-negative int per location."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        values = list(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        values = [value] * len(locations)
    else:
        values = [value]
    if any(isinstance(v, bool) or not isinstance(v, int) for v in values) or len(values) != len(locations):
        raise TypeError(
            f"{name} must be an int (tokens removed at each of the {len(locations)} locations) or a list of "
            f"{len(locations)} ints, got {value!r}"
        )
    if any(v < 0 for v in values):
        raise ValueError(f"{name} must be >= 0, got {values}")
    return values
