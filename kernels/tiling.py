"""The tile of the neighborhood-attention kernels: one decision for the PyTorch reference (the CPU path, and what
``torch.export`` / ONNX trace), the Triton launchers and the ahead-of-time compile sweep (``benchmarks/triton_aot.py``
replays the launchers, so it compiles exactly these tiles).

A tile is ``tile_h x tile_w`` queries of one dilation group; its keys are the halo that holds all their windows,
``(tile_h + k0 - 1) x (tile_w + k1 - 1)`` away from the borders. Larger tiles make larger dense products but waste more
of them on keys outside each query's window (``(t + k - 1)^2 / k^2`` products per useful one for square tiles).

* ``"reference"``: batched dense products on the CPU (``bmm``, and the fused ``scaled_dot_product_attention`` for
  inference): 4 x 8 tiles, 32 queries against a 10 x 14 halo for ``k = 7`` (2.9 products per useful one). Square 4 x 4
  tiles waste less (2.0) but their products are too small to run near the CPU's matmul speed, and copy each key 6
  times into the halos; 7 x 7 / 8 x 8 tiles waste 3.4 / 4.0 (``benchmarks/bench_cpu.py`` measures the choice). A
  dilation group of at most ``2 * k`` queries along an axis is one tile along it.
* ``"triton"``: one program per tile on a GPU. float32 operands (exact products on FMA units, or TF32 ones) take far
  more registers than 16-bit ones: 8 x 8 tiles spill there on sm_80 / sm_90, 4 x 8 tiles do not.
"""

from __future__ import annotations

import torch


def na2d_tile(
    kernel_size: tuple[int, int],
    dtype: torch.dtype,
    backend: str,
    group_size: tuple[int, int] | None = None,
) -> tuple[int, int]:
    """``(tile_h, tile_w)``: most queries per tile and axis of :func:`attnzoo.kernels.na2d` on ``backend``.
    ``group_size``: the queries per axis of the largest dilation group, ``ceil(side / dilation)``; on the CPU an axis
    of at most ``2 * k`` of them is one tile (a dense product over the whole group beats several halos there, and a
    dilated layer whose groups are one window long wastes nothing)."""
    if backend == "triton":
        return (4, 8) if dtype == torch.float32 else (8, 8)
    if backend != "reference":
        raise ValueError(f"backend must be 'reference' or 'triton', got '{backend}'")
    tile_h, tile_w = 4, 8
    if group_size is not None:
        if group_size[0] <= 2 * kernel_size[0]:
            tile_h = max(1, group_size[0])
        if group_size[1] <= 2 * kernel_size[1]:
            tile_w = max(1, group_size[1])
    return (tile_h, tile_w)
