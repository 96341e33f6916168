"""CPU efficiency of the neighborhood and routed attention references and of the models built on them, measured
against a dense matmul on the same machine in the same run; writes ``benchmarks/results/cpu-efficiency.md``.

Every number is a GMAC/s: useful multiply-accumulates (the papers' convention, :mod:`attnzoo.kernels.flops`: a
neighborhood's ``k0 * k1`` keys, the routed regions, forward+backward = 3x the forward's products) per second. The
ceiling is a dense 1024^3 fp32 matmul. Sections:

1. **Ops** (one thread, fp32, batch 1): ``na2d`` reference (kernel 7 + RPB, NAT's stage-1/2/3 shapes) and ``bra2d``
   reference (n_win 7, BiFormer-T's stage-1/2/3 shapes and top-k), forward and forward+backward, as a share of the
   matmul; targets na2d >= 30 %, bra2d >= 40 %. Next to each: the dense products the reference runs (its tiles or
   routed regions, through the same fused ``scaled_dot_product_attention`` call, no gathers or bias), timed alone,
   and their useful GMAC/s: the bound of the tiled formulation on this CPU.
2. **Models**: NAT-T, DiNAT-T and BiFormer-T next to timm's Swin-T (inference, random weights), batch 1 and 32, one
   thread and all threads; target >= 0.9x Swin-T's GMAC/s. With one thread, also the share of the forward spent in
   ``na2d`` / ``bra2d`` and the GMAC/s of the rest of the model.
3. **ONNX**: NAT-Mini, DiNAT-Mini and BiFormer-T exported by ``attnzoo.weights.onnx_export`` (224 px) in onnxruntime
   against PyTorch eager, batch 1 and 32, one thread.

The machine is shared with other jobs: cases are interleaved (every round times each case once), repeated, and the
medians reported; the load average is recorded. Times are wall-clock; with one thread the thread's CPU time is
recorded too (it excludes the time the thread waited for a core), and the GMAC/s from it is the second number.

    python benchmarks/bench_cpu.py --out benchmarks/results/cpu-efficiency.md
    python benchmarks/bench_cpu.py --sections ops --rounds 5      # quick look at the ops only
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import attnzoo  # noqa: F401  (registers the models)
from attnzoo.kernels import bra2d, na2d
from attnzoo.kernels.flops import count_macs, na2d_macs
from attnzoo.kernels.neighborhood import api as na2d_api
from attnzoo.kernels.neighborhood import reference as na2d_reference
from attnzoo.kernels.routing import api as routing_api

NA2D_SHAPES = ((56, 2), (28, 4), (14, 8))  # (side, heads) of NAT-Mini/Tiny stages 1-3 at 224 px, head dim 32
BRA2D_SHAPES = ((56, 2, 1), (28, 4, 4), (14, 8, 16))  # (side, heads, topk) of BiFormer-T stages 1-3 at 224 px
MODELS = ("nat_tiny", "dinat_tiny", "biformer_tiny", "swin_tiny_patch4_window7_224")
ONNX_MODELS = ("nat_mini", "dinat_mini", "biformer_tiny")
HEAD_DIM, KERNEL, N_WIN = 32, 7, 7
TARGETS = {"na2d": 0.30, "bra2d": 0.40, "model": 0.90}


@dataclass
class Case:
    """A timed callable and the useful MACs of one call; ``wall`` / ``cpu`` collect seconds per round."""

    name: str
    run: Callable[[], object]
    macs: float
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def time_once(self) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        self.run()
        self.cpu.append(time.thread_time() - cpu)
        self.wall.append(time.perf_counter() - wall)

    @property
    def ms(self) -> float:
        return statistics.median(self.wall) * 1e3

    @property
    def cpu_ms(self) -> float:
        return statistics.median(self.cpu) * 1e3

    def gmacs(self, cpu: bool = False) -> float:
        return self.macs / (self.cpu_ms if cpu else self.ms) / 1e6


def interleave(cases: list[Case], rounds: int, warmup: int = 1) -> None:
    """Time every case once per round, ``rounds`` times, after ``warmup`` untimed rounds."""
    for _ in range(warmup):
        for case in cases:
            case.run()
    for _ in range(rounds):
        for case in cases:
            case.time_once()


def matmul_case(threads: int) -> Case:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return Case(f"matmul 1024^3 ({threads} thread{'s' * (threads > 1)})", lambda: a @ b, 1024**3)


# ------------------------------------------------------------------------------------------------------------ ops


def _na2d_inputs(side: int, heads: int, grad: bool):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(1, side, side, 3, heads, HEAD_DIM, generator=g)  # q, k, v as views of one projection
    rpb = torch.randn(heads, 2 * KERNEL - 1, 2 * KERNEL - 1, generator=g)
    if grad:
        qkv.requires_grad_()
        rpb.requires_grad_()
    return qkv, rpb


def na2d_cases(side: int, heads: int) -> list[Case]:
    macs = na2d_macs((1, side, side, heads, HEAD_DIM), (KERNEL, KERNEL))
    qkv, rpb = _na2d_inputs(side, heads, False)
    qkv_g, rpb_g = _na2d_inputs(side, heads, True)

    def forward():
        with torch.inference_mode():
            na2d(*qkv.unbind(3), KERNEL, rpb=rpb, backend="reference")

    def forward_backward():
        out = na2d(*qkv_g.unbind(3), KERNEL, rpb=rpb_g, backend="reference")
        out.backward(torch.ones_like(out))

    label = f"na2d {side}x{side}, {heads} heads"
    return [
        Case(f"{label} | fwd", forward, macs),
        Case(f"{label} | fwd+bwd", forward_backward, 3 * macs),
        _na2d_products(side, heads, macs),
    ]


def _na2d_products(side: int, heads: int, macs: int) -> Case:
    """The reference's fused tile products alone: the same ``scaled_dot_product_attention`` call on already gathered
    tiles with the already built bias (the reference's geometry and tile)."""
    tile = na2d_reference._default_tile(side, side, (KERNEL, KERNEL), (1, 1), torch.float32)
    geo = na2d_reference._geometry(side, side, (KERNEL, KERNEL), (1, 1), tile, torch.device("cpu"))
    tiles = geo.rows.valid.shape[0] * geo.cols.valid.shape[0]
    queries = geo.rows.valid.shape[1] * geo.cols.valid.shape[1]
    keys = geo.rows.valid.shape[2] * geo.cols.valid.shape[2]
    q = torch.randn(1, heads * tiles, queries, HEAD_DIM)
    k, v = torch.randn(2, 1, heads * tiles, keys, HEAD_DIM)
    rpb = torch.randn(heads, 2 * KERNEL - 1, 2 * KERNEL - 1)
    mask = na2d_reference._attention_mask(geo, rpb, heads, (KERNEL, KERNEL), torch.float32).view(1, -1, queries, keys)
    case = Case(
        f"na2d {side}x{side}, {heads} heads | tile products only ({tile[0]}x{tile[1]} tiles, {queries} queries x "
        f"{keys} keys, {tiles * queries * keys / (side * side * KERNEL * KERNEL):.1f}x the useful products)",
        lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        macs,
    )
    return case


def bra2d_cases(side: int, heads: int, topk: int) -> list[Case]:
    macs = routing_api.bra2d_macs(torch.empty(1, side, side, heads, HEAD_DIM, device="meta"),
                                  torch.empty(1, side, side, heads, HEAD_DIM, device="meta"), N_WIN, topk)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(1, side, side, 3, heads, HEAD_DIM, generator=g)
    qkv_g = qkv.clone().requires_grad_()

    def forward():
        with torch.inference_mode():
            bra2d(*qkv.unbind(3), N_WIN, topk, backend="reference")

    def forward_backward():
        out = bra2d(*qkv_g.unbind(3), N_WIN, topk, backend="reference")
        out.backward(torch.ones_like(out))

    regions, tokens = N_WIN * N_WIN, (-(-side // N_WIN)) ** 2
    q = torch.randn(heads, regions, tokens, HEAD_DIM)
    k, v = torch.randn(2, heads, regions, topk * tokens, HEAD_DIM)
    label = f"bra2d {side}x{side}, {heads} heads, top-{topk}"
    return [
        Case(f"{label} | fwd", forward, macs),
        Case(f"{label} | fwd+bwd", forward_backward, 3 * macs),
        Case(
            f"{label} | region products only ({regions} regions x {heads} heads, {tokens} queries x "
            f"{topk * tokens} keys)",
            lambda: F.scaled_dot_product_attention(q, k, v),
            macs,
        ),
    ]


def ops_section(rounds: int) -> list[str]:
    torch.set_num_threads(1)
    ceiling = matmul_case(1)
    cases = [ceiling]
    for side, heads in NA2D_SHAPES:
        cases += na2d_cases(side, heads)
    for side, heads, topk in BRA2D_SHAPES:
        cases += bra2d_cases(side, heads, topk)
    interleave(cases, rounds)
    peak, peak_cpu = ceiling.gmacs(), ceiling.gmacs(cpu=True)
    lines = [
        "## Ops: `na2d` and `bra2d` references (1 thread, fp32, batch 1)",
        "",
        f"Ceiling: {ceiling.name}: **{peak:.1f} GMAC/s** wall-clock ({peak_cpu:.1f} from CPU time), median of "
        f"{rounds}.",
        "",
        "| op, shape | pass | ms | GMAC/s | % of matmul | CPU-time GMAC/s | % | target | met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case in cases[1:]:
        op, rest = case.name.split(" | ")
        kind = op.split()[0]
        share, share_cpu = case.gmacs() / peak, case.gmacs(cpu=True) / peak_cpu
        products = rest.endswith(")") and "only" in rest
        target = "" if products else f"{TARGETS[kind]:.0%}"
        met = "" if products else ("yes" if share >= TARGETS[kind] else "no")
        lines.append(
            f"| {op} | {rest} | {case.ms:.2f} | {case.gmacs():.1f} | {share:.0%} | {case.gmacs(cpu=True):.1f} | "
            f"{share_cpu:.0%} | {target} | {met} |"
        )
    return lines


# --------------------------------------------------------------------------------------------------------- models


@contextlib.contextmanager
def attention_timer() -> Iterator[dict[str, float]]:
    """Accumulates the thread time spent inside ``na2d`` / ``bra2d`` (their dispatch functions) while active."""
    spent = {"attention": 0.0}
    originals = na2d_api._na2d_dispatch, routing_api._bra2d_dispatch

    def timed(fn):
        def wrapper(*args, **kwargs):
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent["attention"] += time.thread_time() - start

        return wrapper

    na2d_api._na2d_dispatch, routing_api._bra2d_dispatch = timed(originals[0]), timed(originals[1])
    try:
        yield spent
    finally:
        na2d_api._na2d_dispatch, routing_api._bra2d_dispatch = originals


def model_cases(batch: int) -> list[Case]:
    cases = []
    for name in MODELS:
        macs, _ = count_macs(timm.create_model(name, device="meta").eval(), torch.empty(1, 3, 224, 224, device="meta"))
        torch.manual_seed(0)
        model = timm.create_model(name).eval()
        x = torch.randn(batch, 3, 224, 224)

        def run(model=model, x=x):
            with torch.inference_mode():
                model(x)

        cases.append(Case(name, run, macs * batch))
    return cases


def attention_share(name: str, rounds: int) -> tuple[float, float]:
    """``(seconds in na2d / bra2d, seconds in all)`` of one batch-1 forward (medians, thread time)."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, 224, 224)
    parts, totals = [], []
    with torch.inference_mode():
        model(x)
        for _ in range(rounds):
            with attention_timer() as spent:
                start = time.thread_time()
                model(x)
                totals.append(time.thread_time() - start)
            parts.append(spent["attention"])
    return statistics.median(parts), statistics.median(totals)


def models_section(rounds: int, big_batch: int) -> list[str]:
    threads_all = os.cpu_count() or 1
    lines = [
        "## Models: inference GMAC/s next to timm's Swin-T (fp32, 224 px, random weights)",
        "",
        "| threads | batch | model | GMACs / image | ms | img/s | GMAC/s | x Swin-T | CPU-time GMAC/s | x Swin-T | "
        "target | met |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for threads in dict.fromkeys((1, threads_all)):
        torch.set_num_threads(threads)
        for batch in (1, big_batch):
            cases = model_cases(batch)
            interleave(cases, rounds if batch == 1 else max(2, rounds // 3))
            swin = cases[-1]
            for case in cases:
                ratio, ratio_cpu = case.gmacs() / swin.gmacs(), case.gmacs(cpu=True) / swin.gmacs(cpu=True)
                is_swin = case is swin
                cpu_cols = f"{case.gmacs(cpu=True):.1f} | {ratio_cpu:.2f}" if threads == 1 else "- | -"
                lines.append(
                    f"| {threads} | {batch} | {case.name}{' (timm)' if is_swin else ''} | "
                    f"{case.macs / batch / 1e9:.2f} | {case.ms:.1f} | {batch * 1e3 / case.ms:.1f} | "
                    f"{case.gmacs():.1f} | {ratio:.2f} | {cpu_cols} | {'' if is_swin else '0.9'} | "
                    f"{'' if is_swin else ('yes' if ratio >= TARGETS['model'] else 'no')} |"
                )
    torch.set_num_threads(1)
    lines += [
        "",
        "Where the time goes (1 thread, batch 1, thread time; `na2d` / `bra2d` calls timed inside the forward):",
        "",
        "| model | forward ms | in na2d / bra2d ms | share | GMACs outside them | GMAC/s outside them |",
        "|---|---|---|---|---|---|",
    ]
    for name in MODELS[:-1]:
        attention, total = attention_share(name, max(3, rounds // 2))
        macs, _ = count_macs(timm.create_model(name, device="meta").eval(), torch.empty(1, 3, 224, 224, device="meta"))
        attention_macs = _attention_macs(name)
        rest = (macs - attention_macs) / 1e9
        lines.append(
            f"| {name} | {total * 1e3:.1f} | {attention * 1e3:.1f} | {attention / total:.0%} | {rest:.2f} | "
            f"{rest / (total - attention):.1f} |"
        )
    return lines


def _attention_macs(name: str) -> float:
    """MACs of the ``na2d`` / ``bra2d`` calls of one 224 px forward (their formulas, run on ``meta`` tensors)."""
    counted = {"macs": 0}
    originals = na2d_api._na2d_dispatch, routing_api._bra2d_dispatch

    def on_na2d(q, k, v, kernel_size, dilation, rpb, scale, backend):
        counted["macs"] += na2d_macs(tuple(q.shape), kernel_size, dilation)
        return originals[0](q, k, v, kernel_size, dilation, rpb, scale, backend)

    def on_bra2d(q, k, v, n_win, topk, scale, backend, padding):
        counted["macs"] += routing_api.bra2d_macs(q, v, n_win, topk)
        return originals[1](q, k, v, n_win, topk, scale, backend, padding)

    na2d_api._na2d_dispatch, routing_api._bra2d_dispatch = on_na2d, on_bra2d
    try:
        with torch.device("meta"), torch.no_grad():
            timm.create_model(name)(torch.empty(1, 3, 224, 224))
    finally:
        na2d_api._na2d_dispatch, routing_api._bra2d_dispatch = originals
    return counted["macs"]


# ----------------------------------------------------------------------------------------------------------- onnx


def onnx_section(rounds: int, big_batch: int, folder: Path) -> list[str]:
    import onnxruntime

    from attnzoo.recipes.export import export_for_timm
    from attnzoo.weights.onnx_export import export_onnx

    torch.set_num_threads(1)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    lines = [
        "## ONNX: onnxruntime vs PyTorch eager (1 thread, fp32, 224 px, random weights)",
        "",
        "Files written by `attnzoo.weights.onnx_export.export_onnx` (opset 18, dynamic batch: the `attnzoo export "
        f"--onnx` path) from the same weights as the eager model; onnxruntime {onnxruntime.__version__}, CPU execution "
        "provider, one intra-op thread.",
        "",
        "| model | batch | PyTorch ms | onnxruntime ms | onnxruntime speed-up | max abs difference |",
        "|---|---|---|---|---|---|",
    ]
    models = {}
    for name in ONNX_MODELS:
        torch.manual_seed(0)  # the same weights in every run, so exported files can be reused
        model = timm.create_model(name).eval()
        path = folder / f"{name}.onnx"
        if not path.exists():
            export_onnx(name, path, weights=export_for_timm(model, folder / name).parent)
        models[name] = (model, onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))
    for batch in (1, big_batch):
        cases, diffs = [], {}
        for name, (model, session) in models.items():
            x = torch.randn(batch, 3, 224, 224)
            feed = {session.get_inputs()[0].name: x.numpy()}

            def eager(model=model, x=x):
                with torch.inference_mode():
                    return model(x)

            def ort(session=session, feed=feed):
                return session.run(None, feed)[0]

            diffs[name] = (torch.from_numpy(ort()) - eager()).abs().max().item()
            cases += [Case(f"{name} eager", eager, 0), Case(f"{name} onnx", ort, 0)]
        interleave(cases, rounds if batch == 1 else max(2, rounds // 3))
        for eager_case, ort_case in zip(cases[::2], cases[1::2]):
            name = eager_case.name.split()[0]
            lines.append(
                f"| {name} | {batch} | {eager_case.ms:.1f} | {ort_case.ms:.1f} | {eager_case.ms / ort_case.ms:.2f}x | "
                f"{diffs[name]:.1e} |"
            )
    return lines


# ------------------------------------------------------------------------------------------------------------- main


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def header(args: argparse.Namespace, load: list[tuple[float, float, float]]) -> list[str]:
    import onnxruntime

    first, last = load[0], load[-1]
    return [
        "# CPU efficiency: `na2d` / `bra2d` references and NAT / DiNAT / BiFormer vs Swin-T",
        "",
        f"`benchmarks/bench_cpu.py` ({' '.join(sys.argv[1:]) or 'defaults'}). GMAC/s = useful multiply-accumulates "
        "(the papers' convention: a neighborhood's k0 x k1 keys, the routed regions; forward+backward counts 3x the "
        "forward's products) per second; the ceiling is a dense 1024^3 fp32 matmul timed in the same run.",
        "",
        f"- Machine: {_cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        f"- Versions: torch {torch.__version__}, timm {timm.__version__}, onnxruntime {onnxruntime.__version__}",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- Load average (1 min) {first[0]:.1f} at the start, {last[0]:.1f} at the end; **the machine is shared with "
        "other engineers' jobs**: the cases of each table are interleaved (every round times each case once), "
        f"repeated ({args.rounds} rounds for the ops and batch-1 models, a third of that at batch {args.batch}) and "
        "the medians reported. Wall-clock times include waiting for a core; with one thread the CPU-time columns use "
        "the thread's own CPU time instead.",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="markdown file to write (default: print)")
    parser.add_argument("--sections", nargs="+", default=["ops", "models", "onnx"], choices=["ops", "models", "onnx"])
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds (batch-32 tables: a third)")
    parser.add_argument("--batch", type=int, default=32, help="the large batch of the model and ONNX tables")
    parser.add_argument("--onnx-dir", type=Path, default=None, help="keep / reuse the exported files here")
    args = parser.parse_args()

    load = [os.getloadavg()]
    body: list[str] = []
    if "ops" in args.sections:
        body += ops_section(args.rounds) + [""]
        load.append(os.getloadavg())
    if "models" in args.sections:
        body += models_section(args.rounds, args.batch) + [""]
        load.append(os.getloadavg())
    if "onnx" in args.sections:
        with tempfile.TemporaryDirectory() as tmp:
            folder = args.onnx_dir or Path(tmp)
            folder.mkdir(parents=True, exist_ok=True)
            body += onnx_section(args.rounds, args.batch, folder) + [""]
        load.append(os.getloadavg())
    text = "\n".join(header(args, load) + body)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
