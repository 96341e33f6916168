"""Token Pooling (Marin et al., "Token Pooling in Vision Transformers", arXiv:2110.03860 / WACV 2023), written from
the paper's description.

Between blocks, the patch tokens are downsampled to ``K`` tokens that minimise the reconstruction error of the
original set (each token approximated by its nearest kept token, weighted by the tokens' significance): weighted
K-medoids on the block outputs, initialised with the ``K`` most significant tokens (so the result is never worse than
keeping the top-``K`` tokens by score), then a fixed number of assign / update iterations. The cluster centres become
the new tokens (the medoids, or the clusters' size-weighted means with ``center="mean"``) with sizes = the original
tokens each cluster holds, so proportional attention counts them correctly. Significance is the attention a token
receives in the block, averaged over heads and (size-weighted) queries (PoWER-BERT's score); it is recomputed from the
block's own queries and keys, proportional attention included. Prefix tokens (class / register / distillation) are
never clustered.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .token_reduction import BlockAttention, Reduction, TokenReducer, reduction_locations

__all__ = ["TokenPoolingReducer", "pool_tokens", "weighted_kmedoids"]

CENTERS = ("medoid", "mean")


def _assign(distance: torch.Tensor, medoids: torch.Tensor) -> torch.Tensor:
    """Nearest medoid ``(B, n)`` of every token; each medoid is in its own cluster (also with duplicate tokens)."""
    nearest = distance.gather(2, medoids.unsqueeze(1).expand(-1, distance.shape[1], -1)).argmin(dim=-1)
    clusters = torch.arange(medoids.shape[1], device=medoids.device).expand_as(medoids)
    return nearest.scatter(1, medoids, clusters)


def _update(x: torch.Tensor, sq_norm: torch.Tensor, weight: torch.Tensor, assign: torch.Tensor, k: int) -> torch.Tensor:
    """The member of each cluster minimising the weighted squared distance to its cluster, ``(B, k)``.

    ``sum_i w_i |x_i - x_m|^2 = W |x_m|^2 - 2 x_m . S + const`` per cluster (``W``, ``S``: the cluster's weight and
    weighted sum), so every candidate costs ``O(C)``; ties go to the lowest index.
    """
    B, n, C = x.shape
    total = weight.new_zeros(B, k).scatter_add(1, assign, weight)
    moment = x.new_zeros(B, k, C).scatter_add(1, assign.unsqueeze(-1).expand(-1, -1, C), x * weight.unsqueeze(-1))
    own_moment = moment.gather(1, assign.unsqueeze(-1).expand(-1, -1, C))
    cost = total.gather(1, assign) * sq_norm - 2 * (x * own_moment).sum(dim=-1)
    best = cost.new_full((B, k), float("inf")).scatter_reduce(1, assign, cost, "amin")
    index = torch.arange(n, device=x.device).expand(B, -1)
    candidates = torch.where(cost <= best.gather(1, assign), index, n)
    return torch.full_like(best, n, dtype=torch.long).scatter_reduce(1, assign, candidates, "amin")


@torch.no_grad()
def weighted_kmedoids(
    x: torch.Tensor, weight: torch.Tensor, k: int, iterations: int, score: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted K-medoids of the tokens ``x`` ``(B, n, C)`` with weights ``(B, n)`` (squared Euclidean distances).

    Initialised with the ``k`` highest ``score`` ``(B, n)`` (default: the weights), then ``iterations`` assign /
    update rounds. Returns the medoids ``(B, k)`` (token indices, ascending) and each token's cluster ``(B, n)`` (an
    index into the medoids).

    An image whose tokens, weights or scores are not finite (NaN/inf input) has no meaningful clustering: it is
    clustered as if all its tokens were equal (valid indices, the first ``k`` tokens as medoids), so the damage stays
    in that image (its pooled tokens carry the non-finite values) and the other images are clustered as usual.
    """
    if not 1 <= k <= x.shape[1]:
        raise ValueError(f"the number of clusters must be in [1, {x.shape[1]}] (the tokens), got {k}")
    score = weight if score is None else score
    sq_norm = (x * x).sum(dim=-1)
    distance = sq_norm.unsqueeze(2) + sq_norm.unsqueeze(1) - 2 * x @ x.transpose(1, 2)  # (B, n, n)
    # NaN/inf images (comparisons with NaN would select no index): all-equal tokens instead; branch-free for tracing
    finite = distance.isfinite().all(dim=2).all(dim=1) & weight.isfinite().all(dim=1) & score.isfinite().all(dim=1)
    x, sq_norm = torch.where(finite.view(-1, 1, 1), x, 0.0), torch.where(finite.view(-1, 1), sq_norm, 0.0)
    distance = torch.where(finite.view(-1, 1, 1), distance, 0.0)
    weight, score = torch.where(finite.view(-1, 1), weight, 1.0), torch.where(finite.view(-1, 1), score, 0.0)
    medoids = score.topk(k, dim=-1).indices
    for _ in range(iterations):
        medoids = _update(x, sq_norm, weight, _assign(distance, medoids), k)
    medoids = medoids.sort(dim=-1).values
    return medoids, _assign(distance, medoids)


def pool_tokens(
    x: torch.Tensor,
    size: torch.Tensor | None,
    significance: torch.Tensor,
    k: int,
    num_prefix: int,
    iterations: int = 5,
    center: str = "medoid",
    weighted: bool = True,
) -> Reduction:
    """Pool the patch tokens of ``x`` ``(B, N, C)`` into ``k`` clusters by :func:`weighted_kmedoids`, initialised by
    ``significance`` ``(B, N)`` and weighted by it (``weighted``) or by the sizes; returns ``(B, num_prefix + k, ...)``
    tokens (the prefix, then the clusters in the order of their medoids) with sizes = the sizes each cluster holds."""
    B, N, C = x.shape
    if size is None:
        size = x.new_ones(B, N, 1)
    if center not in CENTERS:
        raise ValueError(f"center must be one of {CENTERS}, got {center!r}")
    patches, patch_size, score = x[:, num_prefix:], size[:, num_prefix:], significance[:, num_prefix:]
    weight = score if weighted else patch_size[..., 0]
    medoids, assign = weighted_kmedoids(patches.detach(), weight.detach(), k, iterations, score.detach())
    new_size = patch_size.new_zeros(B, k, 1).scatter_add(1, assign.unsqueeze(-1), patch_size)
    if center == "medoid":
        centers = patches.gather(1, medoids.unsqueeze(-1).expand(-1, -1, C))
    else:
        sums = patches.new_zeros(B, k, C).scatter_add(1, assign.unsqueeze(-1).expand(-1, -1, C), patches * patch_size)
        centers = sums / new_size
    prefix = torch.arange(num_prefix, device=x.device).expand(B, -1)
    return Reduction(
        torch.cat([x[:, :num_prefix], centers], dim=1),
        torch.cat([size[:, :num_prefix], new_size], dim=1),
        torch.cat([prefix, assign + num_prefix], dim=1),
    )


class TokenPoolingReducer(TokenReducer):
    """Token Pooling as a :class:`~attnzoo.layers.TokenReducer` (pooling the outputs of the ``locations`` blocks).

    Args:
        depth: number of blocks.
        keep_ratio: fraction of the patch tokens kept at each location, in ``(0, 1]`` (a float or one per location;
            ``K = max(1, round(keep_ratio * n))``); default 0.6.
        num_clusters: instead of ``keep_ratio``, the patch tokens kept after each location (one int per location).
        locations: 0-based indices of the blocks whose outputs are pooled (``None``: blocks 3, 6, 9 of 12, scaled to
            other depths: ``depth * k // 4``, ``k = 1, 2, 3``).
        iterations: K-medoids assign / update rounds after the top-significance initialisation.
        weighted: weight the clustering by significance (else by size: plain reconstruction error).
        center: ``"medoid"`` (the paper's K-medoids: the new token is the medoid) or ``"mean"`` (the cluster's
            size-weighted mean).
    """

    name = "token_pooling"
    after_mlp = True

    def __init__(
        self,
        depth: int,
        keep_ratio: float | Sequence[float] | None = None,
        num_clusters: Sequence[int] | None = None,
        locations: Sequence[int] | None = None,
        iterations: int = 5,
        weighted: bool = True,
        center: str = "medoid",
    ) -> None:
        self.locations = reduction_locations(locations, depth)
        if keep_ratio is not None and num_clusters is not None:
            raise ValueError("give keep_ratio or num_clusters, not both")
        if num_clusters is not None:
            counts, n_loc = list(num_clusters), len(self.locations)
            if len(counts) != n_loc or any(isinstance(c, bool) or not isinstance(c, int) for c in counts):
                raise TypeError(f"num_clusters must be one int per location ({n_loc}), got {num_clusters!r}")
            if any(c < 1 for c in counts):
                raise ValueError(f"num_clusters must be >= 1, got {counts}")
            self.keep: list[float | int] = counts
        else:
            ratio = 0.6 if keep_ratio is None else keep_ratio
            if isinstance(ratio, (int, float)):
                ratios = [ratio] * len(self.locations)
            else:
                ratios = list(ratio) if isinstance(ratio, Sequence) and not isinstance(ratio, str) else [ratio]
            if len(ratios) != len(self.locations) or not all(isinstance(v, (int, float)) for v in ratios):
                raise TypeError(
                    f"keep_ratio must be a float in (0, 1] or a list of {len(self.locations)} (one per location), "
                    f"got {ratio!r}"
                )
            if any(isinstance(v, bool) or not 0.0 < v <= 1.0 for v in ratios):
                raise ValueError(f"keep_ratio must be in (0, 1], got {ratios}")
            self.keep = [float(v) for v in ratios]
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise ValueError(f"iterations must be an int >= 0, got {iterations!r}")
        if center not in CENTERS:
            raise ValueError(f"center must be one of {CENTERS}, got {center!r}")
        self.iterations, self.weighted, self.center = iterations, bool(weighted), center

    def tokens_removed(self, index: int, num_tokens: int, num_prefix: int) -> int:
        if index not in self.locations:
            return 0
        keep, n = self.keep[self.locations.index(index)], num_tokens - num_prefix
        if isinstance(keep, int):
            if keep > n:
                raise ValueError(f"num_clusters {keep} at block {index} is more than the {n} patch tokens there")
            return n - keep
        return n - max(1, round(keep * n))

    def reduce(
        self, attention: BlockAttention, x: torch.Tensor, size: torch.Tensor | None, num_remove: int
    ) -> Reduction:
        k = x.shape[1] - attention.num_prefix - num_remove
        significance = attention.attention_received()
        return pool_tokens(x, size, significance, k, attention.num_prefix, self.iterations, self.center, self.weighted)

    def is_identity(self) -> bool:
        return all(isinstance(keep, float) and keep == 1.0 for keep in self.keep)

    def __repr__(self) -> str:
        return f"TokenPoolingReducer(locations={self.locations}, keep={self.keep}, iterations={self.iterations})"
