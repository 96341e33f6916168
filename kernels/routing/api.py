"""Bi-level routing attention (Zhu et al., 2023, "BiFormer"): public functions, argument checks and dispatch.

A feature map is split into an ``S x S`` grid of regions (``n_win = S``). :func:`route` picks, for every query
region, the ``topk`` key regions with the highest affinity between region-mean queries and keys (shared by all heads,
detached); :func:`routed_attention` lets every query token attend, per head, to all tokens of its region's routed
regions: ``softmax(q K_g^T * scale) V_g``. :func:`bra2d` does both on a ``(B, H, W, heads, D)`` map of any size.

Backends (``backend=``, see :func:`attnzoo.kernels.resolve_backend`): ``"reference"`` gathers the routed regions in
PyTorch; ``"triton"`` streams them by index from the un-gathered K/V in a fused kernel (deterministic backward,
float16 / bfloat16 / float32); ``"auto"`` takes Triton on CUDA and the reference elsewhere (and for float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dispatch import resolve_backend
from .reference import (
    map_to_regions,
    region_means,
    regions_to_map,
    route_means,
    routed_attention_reference,
)

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _check_n_win(n_win: int) -> None:
    if not isinstance(n_win, int) or isinstance(n_win, bool) or n_win < 1:
        raise ValueError(f"n_win must be a positive int, got {n_win!r}")


def _check_topk(topk: int, regions: int) -> None:
    if not isinstance(topk, int) or isinstance(topk, bool) or not 1 <= topk <= regions:
        raise ValueError(f"topk must be an int in [1, n_win**2 = {regions}], got {topk!r}")


def _check_float(name: str, x: torch.Tensor, ndims: tuple[int, ...] = (5,)) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim not in ndims:
        raise ValueError(f"{name} must be {' or '.join(map(str, ndims))}-D, got shape {tuple(x.shape)}")


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_float(name, x)
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape != k.shape or q.shape[:-1] != v.shape[:-1]:
        raise ValueError(
            f"q and k must have one shape and v the same except for its last dim, got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )


def _check_triton_support(q: torch.Tensor, v: torch.Tensor) -> None:
    if q.dtype not in TRITON_DTYPES:
        raise TypeError(f"backend='triton' supports dtypes {TRITON_DTYPES}, got {q.dtype} (use backend='reference')")
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        raise ValueError(
            f"backend='triton' tiles head dims up to {MAX_HEAD_DIM}, got q/k {q.shape[-1]}, v {v.shape[-1]} "
            "(use backend='reference' or more heads)"
        )


def default_scale(q: torch.Tensor) -> float:
    """The official BiFormer scale ``(heads * D) ** -0.5``: over the full q/k width, not the head width."""
    return (q.shape[-2] * q.shape[-1]) ** -0.5


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor,
    n_win: int,
    layout: str,
    scale: float,
    backend: str,
) -> torch.Tensor:
    """Token attention in ``layout`` (checked inputs) on the resolved backend."""
    if backend == "triton":
        _check_triton_support(q, v)
    elif backend == "auto" and (q.dtype not in TRITON_DTYPES or max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM):
        backend = "reference"
    if resolve_backend(backend, q, k, v, index) == "reference":
        if layout == "regions":
            return routed_attention_reference(q, k, v, index, scale)
        H, W = q.shape[1], q.shape[2]
        out = routed_attention_reference(
            map_to_regions(q, n_win), map_to_regions(k, n_win), map_to_regions(v, n_win), index, scale
        )
        return regions_to_map(out, n_win, H, W)
    from .op import routed_attention_fwd

    return routed_attention_fwd(q, k, v, index, n_win, layout, float(scale))[0]


def route(q: torch.Tensor, k: torch.Tensor, n_win: int, topk: int) -> torch.Tensor:
    """Region-to-region routing index.

    Args:
        q, k: region-major ``(B, n_win**2, T, heads, D)`` (or ``(B, n_win**2, T, C)``).
        n_win: regions per side ``S``.
        topk: routed regions per query region, ``1 <= topk <= S**2``.

    Returns:
        ``(B, S**2, topk)`` int64: for every query region, the key regions whose mean key has the highest dot product
        with its mean query (over all heads and channels). Detached; computed in at least float32.
    """
    _check_n_win(n_win)
    for name, x in (("q", q), ("k", k)):
        _check_float(name, x, (4, 5))
    if q.shape != k.shape or q.shape[1] != n_win * n_win:
        raise ValueError(
            f"q and k must both be (B, n_win**2={n_win * n_win}, T, ...), got {tuple(q.shape)}, {tuple(k.shape)}"
        )
    _check_topk(topk, n_win * n_win)
    return route_means(region_means(q, n_win, "regions"), region_means(k, n_win, "regions"), topk)


def routed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor,
    n_win: int,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Every query token attends, per head, to all tokens of the regions ``index`` routes its region to.

    Args:
        q, k: region-major ``(B, n_win**2, T, heads, D)``; region ``r`` is row ``r // n_win``, column ``r % n_win`` of
            the region grid, its ``T`` tokens in any fixed order.
        v: ``(B, n_win**2, T, heads, Dv)``.
        index: ``(B, n_win**2, topk)`` integer key-region indices in ``[0, n_win**2)`` (e.g. from :func:`route`;
            the reference raises on out-of-range values, the Triton kernel does not check them).
        n_win: regions per side.
        scale: logit scale; default ``(heads * D) ** -0.5`` (the official BiFormer scale, full q/k width).
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``(B, n_win**2, T, heads, Dv)``, differentiable in ``q``, ``k``, ``v``.
    """
    _check_n_win(n_win)
    _check_qkv(q, k, v)
    if q.shape[1] != n_win * n_win:
        raise ValueError(f"q has {q.shape[1]} regions on dim 1, n_win={n_win} needs {n_win * n_win}")
    if (
        not isinstance(index, torch.Tensor)
        or index.is_floating_point()
        or index.is_complex()
        or index.dtype == torch.bool
    ):
        raise TypeError(f"index must be an integer tensor, got {getattr(index, 'dtype', type(index).__name__)}")
    if index.ndim != 3 or index.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"index must be (B, n_win**2, topk) = ({q.shape[0]}, {q.shape[1]}, topk), got {tuple(index.shape)}"
        )
    _check_topk(index.shape[2], n_win * n_win)
    return _attend(q, k, v, index, n_win, "regions", default_scale(q) if scale is None else scale, backend)


def bra2d(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n_win: int,
    topk: int,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Bi-level routing attention on channels-last maps of any size: :func:`route`, then :func:`routed_attention`.

    Args:
        q, k: ``(B, H, W, heads, D)``; v: ``(B, H, W, heads, Dv)``.
        n_win: the map is split into ``n_win x n_win`` regions of ``ceil(H / n_win) x ceil(W / n_win)`` tokens.
        topk: routed regions per query region, ``1 <= topk <= n_win**2``.
        scale: logit scale; default ``(heads * D) ** -0.5`` (official BiFormer).
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    Sides that are not multiples of ``n_win`` are zero-padded at the bottom/right (the padded q/k/v tokens take part
    in routing and attention, as the official ``auto_pad`` — which pads the block input before the qkv projection,
    see :class:`attnzoo.layers.BiLevelRoutingAttention`) and the output is cropped to ``(B, H, W, heads, Dv)``.
    The Triton backend reads and writes the map in place, without region-partition copies.
    """
    _check_n_win(n_win)
    _check_qkv(q, k, v)
    _check_topk(topk, n_win * n_win)
    H, W = q.shape[1], q.shape[2]
    pad_h, pad_w = (-H) % n_win, (-W) % n_win
    if pad_h or pad_w:
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad_w, 0, pad_h)) for x in (q, k, v))
    index = route_means(region_means(q, n_win, "map"), region_means(k, n_win, "map"), topk)
    out = _attend(q, k, v, index, n_win, "map", default_scale(q) if scale is None else scale, backend)
    return out[:, :H, :W] if pad_h or pad_w else out
