"""ToMe, PPT and Token Pooling at matched MACs: throughput, held-out accuracy and agreement (CPU or GPU).

For each MAC budget (a fraction of the plain model's MACs per image, :func:`attnzoo.kernels.flops.count_macs`), every
method gets the setting of its main knob whose MACs are closest to the budget (ToMe: ``r`` per block; PPT: ``r`` at
its default blocks, paper threshold; Token Pooling: ``keep_ratio`` at its default blocks), searched by bisection (MACs
fall monotonically with the knob). Reported per setting:

* **digits** — the gated ViT trained by ``attnzoo demo`` (``--demo-weights``: its export folder), top-1 on the 1,000
  held-out MNIST digits of the demo data module and top-1 agreement with the unreduced model (4 blocks of 16 tokens:
  PPT reduces in every block and Token Pooling after every block but the last, like ToMe);
* **DeiT-S** — ``deit_small_patch16_224`` (random init unless ``--pretrained`` loads timm's weights): images per second
  at ``--batch-sizes`` (inference mode, best of ``--repeats`` interleaved rounds of ``max(1, 8 // batch)`` calls;
  wall clock and per process-CPU second) and top-1 agreement with the unreduced model on scikit-learn's sample photos
  (bench_tome's 10 images).

PPT's per-image choice is reported as the share of (image, reduction block) decisions that pruned.

    python benchmarks/bench_token_reduction.py --demo-weights runs/demo/export --budgets 0.8 0.65 0.5 --threads 1
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from datetime import date

import timm
import torch
import yaml
from bench_tome import sample_images

import attnzoo
from attnzoo.kernels.flops import count_macs
from attnzoo.layers import ppt as ppt_module
from attnzoo.recipes.demo import DEMO_CONFIG
from attnzoo.recipes.embedded import EmbeddedDigits

METHODS = ("tome", "ppt", "token_pooling")


def knob_grid(method: str, num_patches: int, every_block: int | None = None) -> list[dict]:
    """The method's settings from the least to the most reduction; ``every_block`` (the depth): PPT reduces in every
    block and Token Pooling after every block but the last, like ToMe (else their default blocks)."""
    if method == "tome":
        return [{"r": r} for r in range(1, num_patches // 2 + 1)]
    if method == "ppt":
        where = {"locations": list(range(every_block))} if every_block else {}
        return [{"r": r, **where} for r in range(1, num_patches // 2 + 1)]
    where = {"locations": list(range(every_block - 1))} if every_block else {}
    return [{"keep_ratio": k / 100, **where} for k in range(99, 4, -1)]


def macs(model: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.inference_mode():
        return count_macs(model, x[:1])[0]


def match_budget(model: torch.nn.Module, x: torch.Tensor, method: str, grid: list[dict], target: float) -> dict:
    """The grid setting whose MACs per image are closest to ``target`` (MACs fall along the grid)."""
    cache: dict[int, float] = {}

    def cost(i: int) -> float:
        if i not in cache:
            attnzoo.apply_token_reduction(model, method, **grid[i])
            cache[i] = macs(model, x)
        return cache[i]

    lo, hi = 0, len(grid) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost(mid) > target else (lo, mid)
    best = min((lo, hi), key=lambda i: abs(cost(i) - target))
    return {"method": method, "args": grid[best], "macs": cost(best)}


def prune_share(model: torch.nn.Module, run: Callable[[], torch.Tensor]) -> float | None:
    """Share of PPT's per-image decisions that pruned during ``run()`` (``None`` for other methods)."""
    if getattr(model, "token_reducer", None) is None or model.token_reducer.name != "ppt":
        return None
    decisions, policy = [], ppt_module.ppt_policy

    def recording(*args):
        decisions.append(policy(*args))
        return decisions[-1]

    ppt_module.ppt_policy = recording
    try:
        run()
    finally:
        ppt_module.ppt_policy = policy
    return torch.cat(decisions).float().mean().item()


def settings_for(
    model: torch.nn.Module, x: torch.Tensor, budgets: list[float], every_block: bool = False
) -> list[dict]:
    """The plain model, then every method at every budget (see :func:`knob_grid` for ``every_block``)."""
    attnzoo.remove_token_reduction(model)
    plain = macs(model, x)
    num_patches = model.patch_embed(x[:1]).flatten(1, -2).shape[1]
    depth = len(model.blocks) if every_block else None
    rows = [{"method": "plain", "args": {}, "macs": plain, "budget": 1.0}]
    for budget in budgets:
        for method in METHODS:
            match = match_budget(model, x, method, knob_grid(method, num_patches, depth), budget * plain)
            rows.append({**match, "budget": budget})
    attnzoo.remove_token_reduction(model)
    return rows


def configure(model: torch.nn.Module, row: dict) -> torch.nn.Module:
    if row["method"] == "plain":
        return attnzoo.remove_token_reduction(model)
    return attnzoo.apply_token_reduction(model, row["method"], **row["args"])


@torch.inference_mode()
def bench_digits(weights: str, budgets: list[float]) -> list[dict]:
    """Held-out top-1 and agreement of the demo's gated ViT on the 1,000 held-out digits."""
    data = yaml.safe_load(DEMO_CONFIG.read_text())["data"]
    transform = timm.data.create_transform(
        input_size=tuple(data["input_size"]),
        crop_pct=data["crop_pct"],
        interpolation=data["interpolation"],
        mean=tuple(data["mean"]),
        std=tuple(data["std"]),
    )
    digits = EmbeddedDigits(data["dataset"].split("/", 1)[1], data["val_split"], transform=transform)
    images = torch.stack([digits[i][0] for i in range(len(digits))])
    labels = torch.as_tensor(digits.targets)
    model = timm.create_model(f"local-dir:{weights}", pretrained=True).eval()
    rows = settings_for(model, images, budgets, every_block=True)  # 4 blocks, 16 tokens: reduce everywhere
    reference = model(images).argmax(-1)
    for row in rows:
        configure(model, row)
        row["prune_share"] = prune_share(model, lambda: model(images))
        pred = model(images).argmax(-1)
        row["top1"] = (pred == labels).float().mean().item()
        row["agree"] = (pred == reference).float().mean().item()
        row["tokens"] = model.forward_features(images[:1]).shape[1]
        print("digits", row, flush=True)
    return rows


def timed_call(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one ``model(x)``."""
    wall, cpu = time.perf_counter(), time.process_time()
    model(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


@torch.inference_mode()
def bench_deit(args: argparse.Namespace) -> list[dict]:
    """Throughput at every batch size and top-1 agreement on the sample photos of DeiT-S."""
    name = "deit_small_patch16_224"
    model = timm.create_model(name, pretrained=args.pretrained).eval().to(args.device)
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    photos = torch.stack([transform(img) for img in sample_images()]).to(args.device)
    x = {b: torch.randn(b, 3, 224, 224, device=args.device) for b in args.batch_sizes}
    rows = settings_for(model, photos, args.budgets)
    reference = model(photos).argmax(-1)
    for row in rows:
        configure(model, row)
        row["prune_share"] = prune_share(model, lambda: model(photos))
        row["agree"] = (model(photos).argmax(-1) == reference).float().mean().item()
        row["tokens"] = model.forward_features(photos[:1]).shape[1]
        for b in args.batch_sizes:
            model(x[b])  # warm-up
            row[f"wall{b}"] = row[f"cpu{b}"] = float("inf")
    for _ in range(args.repeats):
        for row in rows:
            configure(model, row)
            for b in args.batch_sizes:
                for _ in range(max(1, 8 // b)):  # small batches: several calls per round
                    wall, cpu = timed_call(model, x[b])
                    row[f"wall{b}"], row[f"cpu{b}"] = min(row[f"wall{b}"], wall), min(row[f"cpu{b}"], cpu)
    for row in rows:
        print("deit", row, flush=True)
    return rows


def describe(row: dict) -> str:
    if row["method"] == "plain":
        return "plain"
    args = {k: v for k, v in row["args"].items() if k != "locations"}
    return f"{row['method']} " + ", ".join(f"{k}={v:g}" for k, v in args.items())


def percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-weights", help="export folder of `attnzoo demo` (skip the digits table if absent)")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.8, 0.65, 0.5], help="MACs / plain MACs")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--repeats", type=int, default=3, help="timing rounds (best kept)")
    parser.add_argument("--pretrained", action="store_true", help="load timm's DeiT-S weights (needs them reachable)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    digits = bench_digits(args.demo_weights, args.budgets) if args.demo_weights else []
    deit = bench_deit(args)

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(
        f"\n{date.today()}, {device}, {torch.get_num_threads()} threads, torch {torch.__version__}, timm "
        f"{timm.__version__}, DeiT-S weights: {'pretrained' if args.pretrained else 'random init'}\n"
    )
    if digits:
        print("| budget | setting | tokens out | kMACs | % of plain | held-out top-1 % | agree % | pruned % |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|")
        plain = digits[0]["macs"]
        for row in digits:
            print(
                f"| {row['budget']:.2f} | {describe(row)} | {row['tokens']} | {row['macs'] / 1e3:.1f} | "
                f"{100 * row['macs'] / plain:.1f} | {percent(row['top1'])} | {percent(row['agree'])} | "
                f"{percent(row['prune_share'])} |"
            )
        print()
    sizes = args.batch_sizes
    header = " | ".join(f"img/s b{b} | img/CPU-s b{b}" for b in sizes)
    print(f"| budget | setting | tokens out | GMACs | % of plain | {header} | photo agree % | pruned % |")
    print("|---:|---|---:|---:|---:|" + "---:|" * (2 * len(sizes)) + "---:|---:|")
    plain = deit[0]["macs"]
    for row in deit:
        speeds = " | ".join(f"{b / row[f'wall{b}']:.2f} | {b / row[f'cpu{b}']:.2f}" for b in sizes)
        print(
            f"| {row['budget']:.2f} | {describe(row)} | {row['tokens']} | {row['macs'] / 1e9:.2f} | "
            f"{100 * row['macs'] / plain:.1f} | {speeds} | {percent(row['agree'])} | {percent(row['prune_share'])} |"
        )


if __name__ == "__main__":
    main()
