"""Bi-level routing attention (Zhu et al., 2023, "BiFormer"): public functions, argument checks and dispatch.

A feature map is split into an ``S x S`` grid of regions (``n_win = S``). :func:`route` picks, for every query
region, the ``topk`` key regions with the highest affinity between region-mean queries and keys (shared by all heads,
detached); :func:`routed_attention` lets every query token attend, per head, to all tokens of its region's routed
regions: ``softmax(q K_g^T * scale) V_g``. :func:`bra2d` does both on a ``(B, H, W, heads, D)`` map of any size,
zero-padding it to a multiple of ``n_win`` (``padding="zero"``, official) or excluding the padded tokens
(``padding="mask"``).

A NaN input gives NaN exactly in the outputs that attend to it, on both backends: a query entry its own row, a key
entry the rows of every query region routed to its region (through the routing too), a value entry ``v[..., d]``
channel ``d`` of those rows.

Backends (``backend=``, see :func:`attnzoo.kernels.resolve_backend`): ``"reference"`` gathers the routed regions in
PyTorch; ``"triton"`` streams them by index from the un-gathered K/V in a fused kernel (deterministic backward,
float16 / bfloat16 / float32); ``"auto"`` takes Triton on CUDA and the reference elsewhere (and for float64).
"""

from __future__ import annotations

import torch

from ..arguments import check_head_dims, check_int, empty_output
from ..dispatch import resolve_backend
from ..flops import charged, routed_attention_macs
from .ops import routed_attention_forward_op
from .reference import (
    bra2d_reference,
    pad_map,
    region_means,
    route_map,
    route_means,
    routed_attention_reference,
    valid_tokens,
)

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
PADDINGS = ("zero", "mask")


def _check_n_win(n_win: int) -> None:
    check_int(n_win, "n_win", 1)


def _check_topk(topk: int, regions: int) -> None:
    if check_int(topk, "topk", 1) > regions:
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
    check_head_dims(q, v)


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


def _check_index_range(index: torch.Tensor, regions: int) -> None:
    """Raise if ``index`` holds a value outside ``[0, regions)`` (one host sync)."""
    if index.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(index)).tolist()
    if low < 0 or high >= regions:
        raise ValueError(f"index values must be in [0, n_win**2 = {regions}), got values in [{low}, {high}]")


def _resolve(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *others: torch.Tensor) -> str:
    """``"triton"`` or ``"reference"`` for checked inputs; ``"auto"`` falls back where Triton does not apply."""
    if backend == "triton":
        _check_triton_support(q, v)
    elif backend == "auto" and (q.dtype not in TRITON_DTYPES or max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM):
        backend = "reference"
    return resolve_backend(backend, q, k, v, *others)


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
    if q.ndim == 5:
        check_head_dims(q, k)
    elif q.shape[-1] < 1:
        raise ValueError(f"q and k need at least one channel (last dim), got shape {tuple(q.shape)}")
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
        index: ``(B, n_win**2, topk)`` integer key-region indices in ``[0, n_win**2)`` (e.g. from :func:`route`).
            Out-of-range values raise ``ValueError`` (one host sync). The check is skipped while ``torch.compile``
            traces (it would break the graph); there, out-of-range values are undefined behaviour on Triton.
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
    if not torch.compiler.is_compiling():
        _check_index_range(index, n_win * n_win)
    scale = default_scale(q) if scale is None else scale
    if q.numel() == 0:
        return empty_output(q, k, v)
    backend = _resolve(backend, q, k, v, index)
    B, R, T, heads, d_qk = q.shape
    macs = lambda: routed_attention_macs(B, R, T, heads, d_qk, v.shape[-1], index.shape[-1])
    return charged(macs, _routed_attention_dispatch, q, k, v, index, n_win, float(scale), backend)


def _routed_attention_dispatch(q, k, v, index, n_win: int, scale: float, backend: str) -> torch.Tensor:
    if backend == "reference":
        return routed_attention_reference(q, k, v, index, scale)
    return routed_attention_forward_op(q, k, v, index, n_win, "regions", scale)[0]


def bra2d(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n_win: int,
    topk: int,
    scale: float | None = None,
    backend: str = "auto",
    padding: str = "zero",
) -> torch.Tensor:
    """Bi-level routing attention on channels-last maps of any size: :func:`route`, then :func:`routed_attention`.

    Args:
        q, k: ``(B, H, W, heads, D)``; v: ``(B, H, W, heads, Dv)``.
        n_win: the map is split into ``n_win x n_win`` regions of ``ceil(H / n_win) x ceil(W / n_win)`` tokens.
        topk: routed regions per query region, ``1 <= topk <= n_win**2``.
        scale: logit scale; default ``(heads * D) ** -0.5`` (official BiFormer).
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.
        padding: how sides that are not multiples of ``n_win`` are padded (at the bottom/right, with zeros):
            ``"zero"`` (official ``auto_pad``): the padded q/k/v tokens take part in routing and attention (the
            layer :class:`attnzoo.layers.BiLevelRoutingAttention` even pads its input before the qkv projection);
            ``"mask"``: they are excluded — region means average only valid tokens, regions without valid tokens
            are never routed to (unless ``topk`` exceeds the regions holding valid tokens; then they contribute
            nothing) and padded keys are left out of every softmax. Both give the same result when no padding is
            needed.

    Returns ``(B, H, W, heads, Dv)`` (padded positions cropped). The Triton backend reads and writes the map in
    place, without region-partition copies.
    """
    _check_n_win(n_win)
    _check_qkv(q, k, v)
    _check_topk(topk, n_win * n_win)
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    scale = default_scale(q) if scale is None else scale
    if q.numel() == 0:
        return empty_output(q, k, v)
    backend = _resolve(backend, q, k, v)
    return charged(
        lambda: bra2d_macs(q, v, n_win, topk), _bra2d_dispatch, q, k, v, n_win, topk, float(scale), backend, padding
    )


def bra2d_macs(q: torch.Tensor, v: torch.Tensor, n_win: int, topk: int) -> int:
    """MACs of :func:`bra2d` on the map padded to a multiple of ``n_win``: region-affinity routing plus attention."""
    B, H, W, heads, d_qk = q.shape
    regions, tokens = n_win * n_win, -(-H // n_win) * -(-W // n_win)
    routing = B * regions * regions * heads * d_qk
    return routing + routed_attention_macs(B, regions, tokens, heads, d_qk, v.shape[-1], topk)


def _bra2d_dispatch(q, k, v, n_win: int, topk: int, scale: float, backend: str, padding: str) -> torch.Tensor:
    if backend == "reference":
        return bra2d_reference(q, k, v, n_win, topk, scale, padding == "mask")[0]
    H, W = q.shape[1], q.shape[2]
    q, k, v = pad_map(q, n_win), pad_map(k, n_win), pad_map(v, n_win)
    padded = torch.compiler.is_compiling() or q.shape[1] != H or q.shape[2] != W  # traced: no branch on the size
    masked = padding == "mask" and padded
    index = route_map(q, k, n_win, topk, valid_tokens(H, W, n_win, q.device) if masked else None)
    valid_hw = (H, W) if masked else (0, 0)
    out = routed_attention_forward_op(q, k, v, index, n_win, "map", scale, *valid_hw)[0]
    return out[:, :H, :W] if padded else out
