"""Benchmark bi-level routing attention: the official gather formulation vs attnzoo's reference and Triton kernel.

For the three routing stages of BiFormer-T (n_win 7, top-k 1 / 4 / 16, 2 / 4 / 8 heads of 32 channels) at several
input sizes, times the routed attention (routing included) forward and forward+backward and records the peak memory
it allocates on top of its inputs, for:

* ``gather``: the official formulation — gather the routed K and V regions (``topk`` copies), then explicit
  ``softmax((q * s) K^T) V`` with the logits materialised (written here from the paper's equations);
* ``reference``: :func:`attnzoo.kernels.routing.bra2d` with ``backend="reference"`` (one gather, SDPA);
* ``triton``: ``backend="triton"`` (CUDA only; the CPU interpreter is not a speed target).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the peak of live tensor storage bytes allocated by
ATen ops, tracked at op granularity with a ``TorchDispatchMode`` (op-internal scratch buffers are not seen).

    python benchmarks/bench_routing.py --sizes 224 384 512 --batch 1 --markdown
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from attnzoo.kernels.routing import bra2d

STAGES = ((1, 64, 1), (2, 128, 4), (3, 256, 16))  # (stage, dim, topk) of BiFormer-T; stride 4 * 2**(stage - 1)
N_WIN, HEAD_DIM = 7, 32


def gather_formulation(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_win: int, topk: int) -> torch.Tensor:
    """Official-style BRA on a padded map ``(B, H, W, heads, D)``: region partition, routing, K/V gather, dense
    attention over the gathered tokens with explicit logits."""
    B, H, W, heads, D = q.shape
    rh, rw = H // n_win, W // n_win
    R, T, C = n_win * n_win, rh * rw, heads * D

    def regions(x):
        return x.reshape(B, n_win, rh, n_win, rw, C).permute(0, 1, 3, 2, 4, 5).reshape(B, R, T, C)

    qr, kr, vr = regions(q), regions(k), regions(v)
    scale = C**-0.5
    index = ((qr.mean(2) * scale) @ kr.mean(2).transpose(-1, -2)).detach().topk(topk, dim=-1).indices
    kv = torch.cat([kr, vr], dim=-1)  # (B, R, T, 2C)
    kv_sel = torch.gather(
        kv.unsqueeze(1).expand(B, R, R, T, 2 * C), 2, index.view(B, R, topk, 1, 1).expand(B, R, topk, T, 2 * C)
    )
    k_sel, v_sel = kv_sel.split([C, C], dim=-1)
    k_sel = k_sel.reshape(B * R, topk * T, heads, D).permute(0, 2, 3, 1)  # (BR, heads, D, topk*T)
    v_sel = v_sel.reshape(B * R, topk * T, heads, D).transpose(1, 2)  # (BR, heads, topk*T, D)
    qh = qr.reshape(B * R, T, heads, D).transpose(1, 2)
    out = torch.softmax((qh * scale) @ k_sel, dim=-1) @ v_sel  # (BR, heads, T, D)
    out = out.transpose(1, 2).reshape(B, n_win, n_win, rh, rw, C).permute(0, 1, 3, 2, 4, 5)
    return out.reshape(B, H, W, heads, D)


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of live tensor storage allocated by ops run under this mode."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {key: entry for key, entry in self.live.items() if not entry[0].expired()}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self.live:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def _run(impl: str, q, k, v, topk: int, backward: bool) -> None:
    out = gather_formulation(q, k, v, N_WIN, topk) if impl == "gather" else bra2d(q, k, v, N_WIN, topk, backend=impl)
    if backward:
        out.backward(torch.ones_like(out))


def measure(impl: str, shape: tuple[int, ...], topk: int, backward: bool, repeats: int, device: str) -> tuple:
    """``(median ms, peak MiB above the inputs)``."""
    q, k, v = (torch.randn(shape, device=device, requires_grad=backward) for _ in range(3))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    _run(impl, q, k, v, topk, backward)  # warm-up (and Triton compilation)
    times = []
    for _ in range(repeats):
        for x in (q, k, v):
            x.grad = None
        sync()
        start = time.perf_counter()
        _run(impl, q, k, v, topk, backward)
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    for x in (q, k, v):
        x.grad = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _run(impl, q, k, v, topk, backward)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with PeakTensorMemory() as tracker:
            _run(impl, q, k, v, topk, backward)
        peak = tracker.peak
    return statistics.median(times), peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 384, 512, 1024], help="input sides (px)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--impls", nargs="+", default=None, help="gather, reference, triton (default: all usable)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    impls = args.impls or (["gather", "reference", "triton"] if args.device == "cuda" else ["gather", "reference"])

    rows = []
    for size in args.sizes:
        for stage, dim, topk in STAGES:
            side = size // (4 * 2 ** (stage - 1))
            padded = -(-side // N_WIN) * N_WIN
            shape = (args.batch, padded, padded, dim // HEAD_DIM, HEAD_DIM)
            for backward in (False, True):
                results = {impl: measure(impl, shape, topk, backward, args.repeats, args.device) for impl in impls}
                rows.append((size, stage, padded, topk, "fwd+bwd" if backward else "fwd", results))
                cells = "  ".join(f"{i}: {t:8.2f} ms {m:8.1f} MiB" for i, (t, m) in results.items())
                print(
                    f"{size:>5}px stage {stage} map {padded}x{padded} topk {topk:>2} {rows[-1][4]:<7} {cells}",
                    flush=True,
                )

    if args.markdown:
        print(
            f"\n{datetime.date.today()} | {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
            f"threads | torch {torch.__version__} | batch {args.batch}, fp32, median of {args.repeats}\n"
        )
        head = " | ".join(f"{i} ms | {i} MiB" for i in impls)
        print(f"| input | stage | map (padded) | topk | pass | {head} | speed-up | memory ratio |")
        print("|" + "---|" * (5 + 2 * len(impls) + 2))
        base, best = impls[0], impls[-1]
        for size, stage, padded, topk, mode, results in rows:
            cells = " | ".join(f"{results[i][0]:.2f} | {results[i][1]:.1f}" for i in impls)
            speed = results[base][0] / results[best][0]
            mem = results[base][1] / max(results[best][1], 1e-9)
            print(f"| {size} | {stage} | {padded}x{padded} | {topk} | {mode} | {cells} | {speed:.2f}x | {mem:.2f}x |")


if __name__ == "__main__":
    main()
