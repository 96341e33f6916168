"""Benchmark 2-D neighborhood attention (``na2d``) against its alternatives.

At NAT shapes (56x56 / 28x28 / 14x14 maps with 2 / 4 / 8 heads of 32 channels, i.e. NAT-Mini/Tiny at 224 px),
kernels 7 and 13, dilations 1 and 4 (combinations with ``kernel * dilation`` larger than the map are skipped), times
the forward and the forward+backward pass, with the RPB table, and records the peak memory and the achieved TFLOP/s of:

* ``reference``: :func:`attnzoo.kernels.na2d` with ``backend="reference"`` (tiled, pure PyTorch);
* ``triton``: ``backend="triton"`` (CUDA only; the CPU interpreter is not a speed target);
* ``dense``: SDPA over the whole map with a dense ``(H*W, H*W)`` additive mask (RPB inside the neighborhood,
  ``-inf`` outside), the mask gathered from the RPB table in the timed region so the RPB gets its gradient;
* ``flex``: ``torch.compile``d FlexAttention with a neighborhood block mask and the RPB as ``score_mod`` (forward
  only on CPU, where FlexAttention has no backward);
* ``natten``: ``natten.na2d`` when NATTEN is installed (no RPB: NATTEN >= 0.20 dropped it).

TFLOP/s count only the useful neighborhood FLOPs, ``4 * B * heads * H * W * k0 * k1 * D`` for the forward and 3.5x
that for forward+backward (FlashAttention's convention), whatever the implementation computes. Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` above the inputs; on CPU the peak of live tensor storage allocated by ATen ops
during the call, tracked at op granularity with a ``TorchDispatchMode`` (op-internal scratch is not seen; compiled
FlexAttention allocates inside one fused call and is reported as "-").

    python benchmarks/bench_na2d.py --device cpu --threads 1 --repeats 3 --markdown
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from attnzoo.kernels import na2d

MAPS = ((56, 2), (28, 4), (14, 8))  # (side, heads) of NAT-Mini/Tiny stages 1-3 at 224 px
HEAD_DIM = 32


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of live CPU tensor storage allocated by the ops run under this mode."""

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
                if storage.data_ptr() not in self.live:
                    self.live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def axis_windows(length: int, kernel: int, dilation: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inside (L, L) bool, rel (L, L) long)``: key ``j`` in query ``i``'s window and its RPB index (NATTEN)."""
    pos = torch.arange(length, device=device)
    group, gpos = pos % dilation, pos // dilation
    group_len = (length - group + dilation - 1) // dilation
    start = torch.minimum((gpos - kernel // 2).clamp(min=0), group_len - kernel)
    same_group = group[:, None] == group[None, :]
    offset = gpos[None, :] - start[:, None]
    inside = same_group & (offset >= 0) & (offset < kernel)
    rel = (gpos[None, :] - gpos[:, None] + kernel - 1).clamp(0, 2 * kernel - 2)
    return inside, rel


def dense_index(side: int, kernel: int, dilation: int, device) -> torch.Tensor:
    """``(N, N)`` flat RPB cell of every (query, key) pair, ``(2k-1)^2`` (a ``-inf`` cell) outside the window."""
    inside, rel = axis_windows(side, kernel, dilation, device)
    both = inside[:, None, :, None] & inside[None, :, None, :]
    index = rel[:, None, :, None] * (2 * kernel - 1) + rel[None, :, None, :]
    n = side * side
    return index.masked_fill(~both, (2 * kernel - 1) ** 2).reshape(n, n)


def make_dense(side: int, kernel: int, dilation: int, device) -> Callable:
    index = dense_index(side, kernel, dilation, device)

    def run(q, k, v, rpb):
        B, H, W, heads, D = q.shape
        table = F.pad(rpb.flatten(1), (0, 1), value=float("-inf"))
        mask = table[:, index].unsqueeze(0).to(q.dtype)  # (1, heads, N, N)
        qh, kh, vh = (t.flatten(1, 2).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask).transpose(1, 2).view(q.shape)

    return run


def make_flex(side: int, kernel: int, dilation: int, device) -> Callable:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    inside, rel = axis_windows(side, kernel, dilation, device)

    def mask_mod(b, h, q_idx, kv_idx):
        return inside[q_idx // side, kv_idx // side] & inside[q_idx % side, kv_idx % side]

    n = side * side
    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n, device=device)
    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v, rpb):
        def score_mod(score, b, h, q_idx, kv_idx):
            cell_r = rel[q_idx // side, kv_idx // side]
            cell_c = rel[q_idx % side, kv_idx % side]
            return score + rpb[h, cell_r, cell_c]

        qh, kh, vh = (t.flatten(1, 2).transpose(1, 2) for t in (q, k, v))
        out = compiled(qh, kh, vh, score_mod=score_mod, block_mask=block_mask)
        return out.transpose(1, 2).view(q.shape)

    return run


def make_natten(side: int, kernel: int, dilation: int, device) -> Callable:
    import natten

    def run(q, k, v, rpb):
        return natten.na2d(q, k, v, kernel_size=kernel, dilation=dilation)

    return run


def make_attnzoo(backend: str) -> Callable:
    def factory(side, kernel, dilation, device):
        return lambda q, k, v, rpb: na2d(q, k, v, kernel, dilation=dilation, rpb=rpb, backend=backend)

    return factory


IMPLEMENTATIONS = {
    "reference": make_attnzoo("reference"),
    "triton": make_attnzoo("triton"),
    "dense": make_dense,
    "flex": make_flex,
    "natten": make_natten,
}


def available(name: str, device: torch.device) -> bool:
    if name == "triton":
        return device.type == "cuda" and importlib.util.find_spec("triton") is not None
    if name == "natten":
        return importlib.util.find_spec("natten") is not None
    return True


def measure(
    fn: Callable, inputs: list[torch.Tensor], backward: bool, repeats: int, warmup: int, device, track_memory: bool
):
    """Median milliseconds and peak MiB above the inputs (None where it cannot be tracked)."""

    def step():
        out = fn(*inputs)
        if backward:
            out.backward(torch.ones_like(out))
        return out

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    elif not track_memory:
        peak = None
    else:
        tracker = PeakTensorMemory()
        with tracker:
            step()
        peak = tracker.peak / 2**20 if tracker.peak else None
    return statistics.median(times) * 1e3, peak


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    rows = []
    for side, heads in MAPS:
        if side not in args.maps:
            continue
        for kernel in args.kernels:
            for dilation in args.dilations:
                if kernel * dilation > side:
                    continue
                g = torch.Generator().manual_seed(0)
                shape = (args.batch, side, side, heads, HEAD_DIM)
                flops = 4 * args.batch * heads * side * side * kernel * kernel * HEAD_DIM
                for name in args.impls:
                    if not available(name, device):
                        continue
                    try:
                        fn = IMPLEMENTATIONS[name](side, kernel, dilation, device)
                    except Exception as err:  # noqa: BLE001 - report implementations that cannot run here
                        print(f"skip {name} {side} k{kernel} d{dilation}: {type(err).__name__}: {err}")
                        continue
                    for backward in (False, True):
                        if backward and name == "flex" and device.type == "cpu":
                            continue
                        inputs = [torch.randn(shape, generator=g).to(device, dtype) for _ in range(3)]
                        inputs.append(torch.randn(heads, 2 * kernel - 1, 2 * kernel - 1, generator=g).to(device))
                        for t in inputs:
                            t.requires_grad_(backward)
                        try:
                            ms, mib = measure(fn, inputs, backward, args.repeats, args.warmup, device, name != "flex")
                        except Exception as err:  # noqa: BLE001
                            print(f"fail {name} {side} k{kernel} d{dilation}: {type(err).__name__}: {err}")
                            continue
                        useful = flops * (3.5 if backward else 1.0)
                        row = dict(
                            map=f"{side}x{side}",
                            heads=heads,
                            kernel=kernel,
                            dilation=dilation,
                            pass_="fwd+bwd" if backward else "fwd",
                            impl=name,
                            ms=ms,
                            mib=mib,
                            tflops=useful / (ms * 1e-3) / 1e12,
                        )
                        rows.append(row)
                        mem = f"{mib:.1f}" if mib is not None else "-"
                        print(f"{row['map']} h{heads} k{kernel} d{dilation} {row['pass_']:8s} {name:10s} {ms:9.2f} ms "
                              f"{mem:>8s} MiB {row['tflops']:.4f} TFLOP/s", flush=True)  # fmt: skip
    return rows


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    import timm
    import triton

    impls = [i for i in args.impls if any(r["impl"] == i for r in rows)]
    header = "| map | heads | kernel | dilation | pass | " + " | ".join(
        f"{i} ms | {i} MiB | {i} TFLOP/s" for i in impls
    )
    lines = [
        f"- Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"Python {platform.python_version()}, device {args.device}",
        f"- Versions: torch {torch.__version__}, triton {triton.__version__}, timm {timm.__version__}",
        f"- Date: {datetime.date.today().isoformat()}",
        "",
        header + " |",
        "|" + "---|" * (5 + 3 * len(impls)),
    ]
    keys = sorted(
        {(r["map"], r["heads"], r["kernel"], r["dilation"], r["pass_"]) for r in rows},
        key=lambda k: (-int(k[0].split("x")[0]), k[2], k[3], k[4]),
    )
    for key in keys:
        cells = []
        for impl in impls:
            match = [r for r in rows if (r["map"], r["heads"], r["kernel"], r["dilation"], r["pass_"]) == key]
            match = [r for r in match if r["impl"] == impl]
            if match:
                r = match[0]
                mem = f"{r['mib']:.1f}" if r["mib"] is not None else "-"
                cells.append(f"{r['ms']:.2f} | {mem} | {r['tflops']:.4f}")
            else:
                cells.append("- | - | -")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {key[4]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--maps", type=int, nargs="+", default=[56, 28, 14], help="map sides (56, 28, 14)")
    parser.add_argument("--kernels", type=int, nargs="+", default=[7, 13])
    parser.add_argument("--dilations", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--impls", nargs="+", default=list(IMPLEMENTATIONS), choices=list(IMPLEMENTATIONS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table at the end")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args)
    if args.markdown:
        print(markdown(rows, args))


if __name__ == "__main__":
    main()
