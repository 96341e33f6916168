"""The decay masks' share of RMT / PPMA inference time on CPU.

For each model and input size: the median inference time (batch 1, eval, ``inference_mode``) and, in the same calls,
the time spent building the masks, summed over all blocks: for ``"manhattan"`` mixers the per-head decays and the
``(|dy| + |dx|) log(gamma)`` masks (full or per line), for ``"polyline"`` mixers the per-token decay prediction
(``log_decays``: the ``head_dim -> 2`` projection and softplus) and the polyline path masks (segment sums of every row
and column; in the full form their broadcast addition to the ``(B, heads, N, N)`` logits, fused with the mask's
construction, so PPMA's share includes that addition and RMT's, done inside its attention, does not). The mask
builders are wrapped with timers (wall clock; CPU ops are synchronous), nothing else changes.

    python benchmarks/bench_decay_masks.py --models rmt_tiny ppma_tiny rmt_small ppma_small --sizes 224 512
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import timm
import torch

import attnzoo  # noqa: F401
from attnzoo.layers import manhattan_attention, polyline_attention

_elapsed = [0.0]


def _timed(fn: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        _elapsed[0] += time.perf_counter() - start
        return out

    return wrapper


def instrument() -> None:
    """Wrap every mask builder the two mixers call with a timer."""
    for module, names in (
        (manhattan_attention, ("manhattan_mask", "distance_mask_1d")),
        (polyline_attention, ("add_polyline_path_mask", "polyline_line_masks")),
    ):
        for name in names:
            setattr(module, name, _timed(getattr(module, name)))
    manhattan_attention.ManhattanAttention.log_gamma = _timed(manhattan_attention.ManhattanAttention.log_gamma)
    polyline_attention.PolylineAttention.log_decays = _timed(polyline_attention.PolylineAttention.log_decays)


def measure(name: str, size: int, repeats: int) -> tuple[float, float]:
    """Median total and mask milliseconds of one inference at ``size`` px."""
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, size, size)
    totals, masks = [], []
    with torch.inference_mode():
        for i in range(repeats + 2):
            _elapsed[0] = 0.0
            start = time.perf_counter()
            model(x)
            if i >= 2:  # two warm-up calls
                totals.append((time.perf_counter() - start) * 1e3)
                masks.append(_elapsed[0] * 1e3)
    return statistics.median(totals), statistics.median(masks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["rmt_tiny", "ppma_tiny", "rmt_small", "ppma_small"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 512])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    instrument()
    load = os.getloadavg()[0]
    print("| model | input | infer ms | mask ms | mask share |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        for name in args.models:
            total, mask = measure(name, size, args.repeats)
            print(f"| {name} | {size} | {total:.1f} | {mask:.1f} | {100 * mask / total:.1f}% |", flush=True)
    print(f"\nload average {load:.1f} -> {os.getloadavg()[0]:.1f}, {torch.get_num_threads()} thread(s)")


if __name__ == "__main__":
    main()
