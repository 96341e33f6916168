"""PPT: adaptive token pruning and pooling (Wu et al., "PPT: Token Pruning and Pooling for Efficient Vision
Transformers", arXiv:2310.01812), written from the paper's description.

Training-free. In each reduction block, between the attention and the MLP, ``r`` patch tokens go one of two ways,
chosen per image by the spread of the token importance scores ``s`` (the class token's attention row averaged over
heads; the attention received for models without a class token):

* ``Var(s) > threshold`` (attention concentrates on few tokens -> *inattentive* redundancy): **prune** the ``r``
  patch tokens with the lowest scores;
* otherwise (scores nearly uniform -> *duplicative* redundancy): **pool** ``r`` tokens by ToMe's bipartite soft
  matching on the keys (size-weighted averages, sizes add up).

Both branches remove the same number of tokens, so the per-image choice keeps static shapes (both are computed and
one is selected per image; they are cheap next to a block). ``r`` is clamped to half of the patch tokens (the most
pooling can remove). Paper defaults for DeiT-S off the shelf (official README: ``--r_tokens 50 --pp_loc_list 3 6 9
--threshold 7e-5``, 2.94 GMACs, 79.50 top-1; fine-tuning uses ``threshold 6e-5``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .token_merging import merge_by_keys
from .token_reduction import BlockAttention, Reduction, TokenReducer, per_location, reduction_locations

__all__ = ["PPTReducer", "ppt_policy", "prune_by_importance"]


def prune_by_importance(
    x: torch.Tensor, size: torch.Tensor | None, importance: torch.Tensor, r: int, num_prefix: int
) -> Reduction:
    """Drop the ``r`` patch tokens of ``x`` ``(B, N, C)`` with the lowest ``importance`` ``(B, N)``; the prefix and
    the kept patch tokens stay in their order. Returns ``(B, N - r, ...)`` tokens and sizes."""
    B, N, C = x.shape
    if size is None:
        size = x.new_ones(B, N, 1)
    kept = importance[:, num_prefix:].topk(N - num_prefix - r, dim=-1).indices.sort(dim=-1).values + num_prefix
    index = torch.cat([torch.arange(num_prefix, device=x.device).expand(B, -1), kept], dim=1)  # (B, N - r)
    position = torch.arange(N - r, device=x.device).expand(B, -1)
    assign = torch.full((B, N), -1, dtype=torch.long, device=x.device).scatter(1, index, position)
    return Reduction(x.gather(1, index.unsqueeze(-1).expand(-1, -1, C)), size.gather(1, index.unsqueeze(-1)), assign)


def ppt_policy(importance: torch.Tensor, num_prefix: int, threshold: float) -> torch.Tensor:
    """Per image ``(B,)`` bool: prune (``True``) when the variance of the patch tokens' importance scores
    ``importance[:, num_prefix:]`` exceeds ``threshold``, else pool."""
    return importance[:, num_prefix:].var(dim=-1, correction=0) > threshold


class PPTReducer(TokenReducer):
    """PPT as a :class:`~attnzoo.layers.TokenReducer`.

    Args:
        depth: number of blocks.
        r: tokens removed in each reduction block (an int, or one int per location).
        locations: 0-based indices of the reduction blocks (``None``: blocks 3, 6, 9 of 12, scaled to other depths:
            ``depth * k // 4``, ``k = 1, 2, 3``; ``range(depth)``: every block).
        threshold: the variance threshold ``tau`` of the pruning / pooling choice (``>= 0``; 0: always prune unless
            the scores are all equal, ``inf``: always pool).
    """

    name = "ppt"
    may_prune = True

    def __init__(
        self,
        depth: int,
        r: int | Sequence[int] = 50,
        locations: Sequence[int] | None = None,
        threshold: float = 7e-5,
    ) -> None:
        locations = reduction_locations(locations, depth)
        if not threshold >= 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        self.r = [0] * depth
        for index, value in zip(locations, per_location(r, locations, "r")):
            self.r[index] = value
        self.threshold = float(threshold)

    def tokens_removed(self, index: int, num_tokens: int, num_prefix: int) -> int:
        r = self.r[index] if index < len(self.r) else 0
        return min(r, (num_tokens - num_prefix) // 2)

    def reduce(
        self, attention: BlockAttention, x: torch.Tensor, size: torch.Tensor | None, num_remove: int
    ) -> Reduction:
        importance = attention.importance()
        pruned = prune_by_importance(x, size, importance, num_remove, attention.num_prefix)
        pooled = merge_by_keys(attention, x, size, num_remove)
        prune = ppt_policy(importance, attention.num_prefix, self.threshold)
        return Reduction(
            torch.where(prune.view(-1, 1, 1), pruned.x, pooled.x),
            torch.where(prune.view(-1, 1, 1), pruned.size, pooled.size),
            torch.where(prune.view(-1, 1), pruned.assign, pooled.assign),
        )

    def is_identity(self) -> bool:
        return not any(self.r)

    def __repr__(self) -> str:
        return f"PPTReducer(r={self.r}, threshold={self.threshold:g})"
