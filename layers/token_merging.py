"""Token merging by bipartite soft matching (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023).

A clean-room implementation from the paper's description. Per merging layer, on a token sequence ``(B, N, C)`` whose
first ``num_prefix`` tokens (class / register / distillation tokens) are never merged:

1. the patch tokens alternate into two sets, ``A = patches[0::2]`` and ``B = patches[1::2]``;
2. every ``A`` token keeps its most similar ``B`` token (cosine similarity of the head-averaged attention keys);
3. the ``r`` most similar of those edges are merged: each chosen ``A`` token is folded into its ``B`` token by a
   size-weighted average (``x = merge(x * s) / merge(s)``, sizes add up);
4. the output is ``[prefix, unmerged A (in their original order), B]``, ``N - r`` tokens.

Token counts are static (``r`` is a Python int, clamped to half the patch tokens), so merged models trace with
``torch.compile`` without graph breaks. Instead of the dense ``(N_now, N_orig)`` source matrix, merges are tracked as a
*token map* ``(B, N_orig)``: the index of the current token that holds each original token. It costs ``O(N)`` memory
per image and unmerges any merged sequence with one gather (:func:`unmerge_tokens`). :class:`ToMeReducer` plugs the
method into the block loop shared by all token-reduction methods (:mod:`attnzoo.layers.reduction_patch`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .token_reduction import BlockAttention, Reduction, TokenReducer

__all__ = [
    "MergePlan",
    "ToMeReducer",
    "bipartite_soft_matching",
    "merge_schedule",
    "merge_by_keys",
    "merge_token_map",
    "merge_tokens",
    "proportional_attention_mask",
    "token_map_to_source",
    "unmerge_tokens",
]


class MergePlan(NamedTuple):
    """Which tokens one bipartite soft matching merges, for a sequence with ``num_prefix`` protected tokens.

    Indices are into the ``A`` (``patches[0::2]``) and ``B`` (``patches[1::2]``) sets, all ``(B, ...)`` int64:
    ``kept`` ``(B, n_a - r)`` the unmerged ``A`` tokens (ascending), ``merged`` ``(B, r)`` the merged ``A`` tokens and
    ``dst`` ``(B, r)`` the ``B`` token each of them is merged into.
    """

    kept: torch.Tensor
    merged: torch.Tensor
    dst: torch.Tensor
    num_prefix: int


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_prefix: int = 1) -> MergePlan:
    """Choose the ``r`` merges of one layer from the similarity ``metric`` ``(B, N, D)`` (e.g. head-averaged keys).

    ``r`` is clamped to ``(N - num_prefix) // 2`` (at most half of the patch tokens can merge away).
    """
    if r < 0:
        raise ValueError(f"r must be >= 0, got {r}")
    if not 0 <= num_prefix <= metric.shape[1]:
        raise ValueError(f"num_prefix must be in [0, {metric.shape[1]}], got {num_prefix}")
    patches = F.normalize(metric[:, num_prefix:], dim=-1)
    r = min(r, patches.shape[1] // 2)
    scores = patches[:, 0::2] @ patches[:, 1::2].transpose(1, 2)  # (B, n_a, n_b) cosine similarities
    best_score, best_b = scores.max(dim=-1)  # each A token's best edge
    order = best_score.argsort(dim=-1, descending=True)
    merged = order[:, :r]
    kept = order[:, r:].sort(dim=-1).values
    return MergePlan(kept, merged, best_b.gather(1, merged), num_prefix)


def merge_tokens(
    x: torch.Tensor, plan: MergePlan, size: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``x`` ``(B, N, C)`` by ``plan`` as size-weighted averages; returns ``(x, size)``, ``(B, N - r, C)`` and
    ``(B, N - r, 1)``. ``size`` ``(B, N, 1)`` counts the original tokens in each token (``None``: all ones)."""
    if size is None:
        size = x.new_ones(x.shape[0], x.shape[1], 1)
    p, C = plan.num_prefix, x.shape[-1]
    xa, xb = x[:, p:][:, 0::2], x[:, p:][:, 1::2]
    sa, sb = size[:, p:][:, 0::2], size[:, p:][:, 1::2]
    kept_x = xa.gather(1, plan.kept.unsqueeze(-1).expand(-1, -1, C))
    kept_s = sa.gather(1, plan.kept.unsqueeze(-1))
    src_s = sa.gather(1, plan.merged.unsqueeze(-1))
    src_xs = xa.gather(1, plan.merged.unsqueeze(-1).expand(-1, -1, C)) * src_s
    dst_s = sb.scatter_add(1, plan.dst.unsqueeze(-1), src_s)
    dst_x = (xb * sb).scatter_add(1, plan.dst.unsqueeze(-1).expand(-1, -1, C), src_xs) / dst_s
    return torch.cat([x[:, :p], kept_x, dst_x], dim=1), torch.cat([size[:, :p], kept_s, dst_s], dim=1)


def merge_token_map(token_map: torch.Tensor, plan: MergePlan, num_tokens: int) -> torch.Tensor:
    """Follow one merge: ``token_map`` ``(B, N_orig)`` indexes the ``num_tokens`` tokens before the merge; the result
    indexes the tokens after it."""
    B, p = token_map.shape[0], plan.num_prefix
    n = num_tokens - p
    n_a, n_kept = (n + 1) // 2, plan.kept.shape[1]
    base_b = p + n_kept  # B tokens follow the prefix and the kept A tokens
    arange = torch.arange(max(n_a, p), device=token_map.device)
    new_a = torch.empty(B, n_a, dtype=torch.long, device=token_map.device)
    new_a = new_a.scatter(1, plan.kept, (p + arange[:n_kept]).expand(B, -1))
    new_a = new_a.scatter(1, plan.merged, base_b + plan.dst)
    new_b = (base_b + arange[: n // 2]).expand(B, -1)
    new_patch = torch.stack([new_a[:, : n // 2], new_b], dim=-1).flatten(1)  # interleave A, B back
    if n % 2:
        new_patch = torch.cat([new_patch, new_a[:, -1:]], dim=1)
    new_index = torch.cat([arange[:p].expand(B, -1), new_patch], dim=1)
    return new_index.gather(1, token_map)


def unmerge_tokens(x: torch.Tensor, token_map: torch.Tensor) -> torch.Tensor:
    """Copy every merged token of ``x`` ``(B, N, C)`` back to the positions of its original tokens:
    ``(B, N_orig, C)`` (``token_map`` from :func:`merge_token_map`)."""
    return x.gather(1, token_map.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def token_map_to_source(token_map: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The dense source matrix ``(B, num_tokens, N_orig)``: ``source[b, i, j] = 1`` if token ``i`` holds original
    token ``j`` (the paper's visualisation format)."""
    return F.one_hot(token_map, num_tokens).transpose(1, 2)


def proportional_attention_mask(size: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive SDPA mask ``log(size)`` ``(B, 1, 1, N)``: attention ``softmax(q k^T / sqrt(d) + log s)`` counts each
    key as often as the tokens it holds (proportional attention)."""
    return size.log().to(dtype).transpose(1, 2).unsqueeze(1)


def merge_schedule(r: int | Sequence[int] | tuple[int, float], depth: int) -> list[int]:
    """Tokens to merge in each of ``depth`` blocks.

    ``r``: an int (the same in every block), a list of ``depth`` ints, or ``(r, inflection)`` with ``inflection`` in
    ``[-1, 1]``: ``r_i = round(r * (1 + inflection * (2 i / (depth - 1) - 1)))`` rises linearly over the blocks when
    ``inflection > 0`` (merge more late), falls when ``< 0`` (merge more early) and is constant at 0; the mean stays
    ``r`` up to rounding.
    """
    if isinstance(r, bool):
        raise TypeError("r must be an int, a list of ints or an (r, inflection) tuple, got a bool")
    if isinstance(r, int):
        schedule = [r] * depth
    elif isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], float):
        base, inflection = r
        if not isinstance(base, int) or not -1.0 <= inflection <= 1.0:
            raise ValueError(f"(r, inflection) needs an int r and inflection in [-1, 1], got {r}")
        slope = [2 * i / (depth - 1) - 1 if depth > 1 else 0.0 for i in range(depth)]
        schedule = [int(round(base * (1 + inflection * s))) for s in slope]
    elif isinstance(r, Sequence) and all(isinstance(v, int) and not isinstance(v, bool) for v in r):
        if len(r) != depth:
            raise ValueError(f"a per-block r list needs one entry per block ({depth}), got {len(r)}")
        schedule = list(r)
    else:
        raise TypeError(f"r must be an int, a list of ints or an (r, inflection) tuple, got {r!r}")
    if any(v < 0 for v in schedule):
        raise ValueError(f"r must be >= 0 in every block, got {schedule}")
    return schedule


def merge_by_keys(attention: BlockAttention, x: torch.Tensor, size: torch.Tensor | None, r: int) -> Reduction:
    """ToMe's step as a :class:`~attnzoo.layers.Reduction`: merge ``r`` tokens of ``x`` ``(B, N, C)`` by bipartite
    soft matching on the block's head-averaged keys."""
    plan = bipartite_soft_matching(attention.metric(), r, attention.num_prefix)
    identity = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
    assign = merge_token_map(identity, plan, x.shape[1])
    x, size = merge_tokens(x, plan, size)
    return Reduction(x, size, assign)


class ToMeReducer(TokenReducer):
    """ToMe as a :class:`~attnzoo.layers.TokenReducer`: merge ``r`` tokens per block between the attention and the
    MLP by bipartite soft matching on the head-averaged keys. ``r``: see :func:`merge_schedule`; it is clamped to
    half of the patch tokens in every block."""

    name = "tome"

    def __init__(self, depth: int, r: int | Sequence[int] | tuple[int, float] = 16) -> None:
        self.r = merge_schedule(r, depth)

    def tokens_removed(self, index: int, num_tokens: int, num_prefix: int) -> int:
        r = self.r[index] if index < len(self.r) else 0
        return min(r, (num_tokens - num_prefix) // 2)

    def reduce(
        self, attention: BlockAttention, x: torch.Tensor, size: torch.Tensor | None, num_remove: int
    ) -> Reduction:
        return merge_by_keys(attention, x, size, num_remove)

    def is_identity(self) -> bool:
        return not any(self.r)

    def __repr__(self) -> str:
        return f"ToMeReducer(r={self.r})"
