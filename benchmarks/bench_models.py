"""Benchmark zoo models on CPU next to timm baselines of similar cost: inference latency and a training step.

For every selected model and input size: parameters, GMACs (multiply-accumulates counted by
:func:`attnzoo.kernels.flops.count_macs`, the papers' convention), inference latency at batch ``--batch`` (eval,
``inference_mode``) and the time of one training step at batch ``--train-batch`` (train mode, cross-entropy on random
labels, backward, SGD step), each the median of its repetitions, with images/s and the achieved GMAC/s
(``img/s x GMACs``: how well a model's arithmetic runs on this machine, comparable across models of different cost).

Zoo models take any input size as built; timm baselines with a fixed input size are built with ``img_size=size``.
Default selection: the mini / tiny / small variant of every zoo family (no high-resolution releases) and the
baselines ``deit_small_patch16_224``, ``swin_tiny_patch4_window7_224``, ``convnext_tiny``, ``poolformer_s12``.

    python benchmarks/bench_models.py --threads 1 --sizes 224 512 --markdown
    python benchmarks/bench_models.py --models 'agent_*' convnext_tiny --sizes 224 --no-train
    python benchmarks/bench_models.py --models '*' dinat_large.in22k_ft_in1k_384 --sizes native --no-train
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.kernels.flops import count_macs

BASELINES = ("deit_small_patch16_224", "swin_tiny_patch4_window7_224", "convnext_tiny", "poolformer_s12")
_SMALL_VARIANT = re.compile(r"_(mini|tiny|small|s12)(_patch\d+_\d+)?$")


@dataclass
class Row:
    model: str
    size: int
    params_m: float
    gmacs: float
    infer_ms: float
    train_ms: float | None
    batch: int
    train_batch: int

    @property
    def infer_ips(self) -> float:
        return self.batch * 1e3 / self.infer_ms

    @property
    def train_ips(self) -> float | None:
        return None if self.train_ms is None else self.train_batch * 1e3 / self.train_ms


def default_models() -> list[str]:
    """The mini / tiny / small variant of every zoo family, then the timm baselines."""
    return [name for name in attnzoo.list_models() if _SMALL_VARIANT.search(name)] + list(BASELINES)


def select_models(patterns: list[str]) -> list[str]:
    """Zoo names / fnmatch patterns over the zoo, or any timm model name (``name.tag`` builds that tag's cfg)."""
    zoo = attnzoo.list_models()
    names = []
    for pattern in patterns:
        matched = fnmatch.filter(zoo, pattern) or (
            timm.list_models(pattern) if any(c in pattern for c in "*?[") else []
        )
        if not matched and not timm.is_model(pattern.split(".")[0]):
            raise ValueError(f"--models: {pattern!r} matches no zoo or timm model")
        names += matched or [pattern]
    return list(dict.fromkeys(names))


def resolve_size(name: str, size: str) -> int:
    """An input side in px, or ``"native"``: the side of the model's default (or tagged) cfg."""
    if size == "native":
        return timm.get_pretrained_cfg(name).input_size[-1]
    if not size.isdigit() or int(size) <= 0:
        raise ValueError(f"--sizes takes positive ints or 'native', got {size!r}")
    return int(size)


def build(name: str, size: int, device: str = "cpu") -> torch.nn.Module:
    """``name`` able to run at ``size`` px (timm models with a fixed input size are built for it)."""
    model = timm.create_model(name, device=device)
    if model.pretrained_cfg.get("fixed_input_size") and model.pretrained_cfg["input_size"][-1] != size:
        model = timm.create_model(name, img_size=size, device=device)
    return model


def _median_ms(step, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(name: str, size: int, args: argparse.Namespace) -> Row:
    macs, _ = count_macs(build(name, size, "meta").eval(), torch.empty(1, 3, size, size, device="meta"))
    torch.manual_seed(0)
    model = build(name, size).eval()
    x = torch.randn(args.batch, 3, size, size)

    def infer() -> None:
        with torch.inference_mode():
            model(x)

    infer_ms = _median_ms(infer, args.repeats, warmup=2)
    train_ms = None
    if not args.no_train:
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        xb, yb = torch.randn(args.train_batch, 3, size, size), torch.randint(0, 1000, (args.train_batch,))

        def train_step() -> None:
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        train_ms = _median_ms(train_step, args.train_repeats, warmup=1)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return Row(name, size, params, macs / 1e9, infer_ms, train_ms, args.batch, args.train_batch)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def markdown(rows: list[Row], args: argparse.Namespace, load: tuple[float, float]) -> str:
    train = "" if args.no_train else f", training step batch {args.train_batch} (median of {args.train_repeats})"
    lines = [
        f"{datetime.date.today()} | {_cpu_name()}, {torch.get_num_threads()} threads | torch {torch.__version__}, "
        f"timm {timm.__version__} | fp32 | inference batch {args.batch} (median of {args.repeats}){train} | "
        f"load average {load[0]:.1f} -> {load[1]:.1f}",
        "",
        "| model | input | params (M) | GMACs | infer ms | infer img/s | infer GMAC/s | train step ms | train img/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = r.model if r.model.split(".")[0] in attnzoo.list_models() else f"{r.model} (timm)"
        train = f"{r.train_ms:.0f} | {r.train_ips:.1f}" if r.train_ms is not None else "- | -"
        lines.append(
            f"| {name} | {r.size} | {r.params_m:.1f} | {r.gmacs:.2f} | {r.infer_ms:.1f} | {r.infer_ips:.1f} | "
            f"{r.infer_ips * r.gmacs:.1f} | {train} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, help="names or patterns (default: see above)")
    parser.add_argument(
        "--sizes", nargs="+", default=["224", "512"], help="input sides (px), or 'native' (each model's cfg size)"
    )
    parser.add_argument("--batch", type=int, default=1, help="inference batch")
    parser.add_argument("--train-batch", type=int, default=8, help="training-step batch")
    parser.add_argument("--repeats", type=int, default=10, help="timed inference calls")
    parser.add_argument("--train-repeats", type=int, default=3, help="timed training steps")
    parser.add_argument("--no-train", action="store_true", help="inference only")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table at the end")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = select_models(args.models) if args.models else default_models()

    load_start = os.getloadavg()[0]
    rows = []
    for size in args.sizes:
        for name in names:
            row = measure(name, resolve_size(name, size), args)
            rows.append(row)
            train = f"train {row.train_ms:8.0f} ms {row.train_ips:6.1f} img/s" if row.train_ms is not None else ""
            print(
                f"{name:<36} {row.size:>4}px {row.params_m:6.1f}M {row.gmacs:6.2f} GMACs  "
                f"infer {row.infer_ms:8.1f} ms {row.infer_ips:6.1f} img/s  {train}",
                flush=True,
            )
    if args.markdown:
        print("\n" + markdown(rows, args, (load_start, os.getloadavg()[0])))


if __name__ == "__main__":
    main()
