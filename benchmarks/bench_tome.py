"""ToMe throughput / agreement trade-off on timm ViTs (CPU or GPU).

For each model and merge rate ``r``: images per second of ``model(x)`` (inference mode, fixed batch; wall clock and
per process-CPU second, the latter robust to other processes on a shared machine), MACs per image
(:func:`attnzoo.kernels.flops.count_macs`) and agreement with the same model at ``r=0`` on real photos shipped with
scikit-learn (``china.jpg``, ``flower.jpg`` and crops / flips of them, preprocessed with the model's timm data config):
top-1 agreement and mean cosine similarity of the logits. Pretrained weights are loaded when ``--pretrained`` is given
and reachable; otherwise the models are randomly initialised and the agreement only measures how far merging moves a
random network's outputs, not accuracy.

    python benchmarks/bench_tome.py --models deit_small_patch16_224 vit_base_patch16_224 --rs 0 8 16 paper
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import timm
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from sklearn.datasets import load_sample_image

import attnzoo
from attnzoo.kernels.flops import count_macs

PAPER_R = {"deit_tiny_patch16_224": 12, "deit_small_patch16_224": 13}  # the paper's tables (DeiT-Ti, DeiT-S)


def sample_images() -> list[Image.Image]:
    """scikit-learn's two sample photos, each whole, centre-cropped, corner-cropped and mirrored (10 images)."""
    images = []
    for name in ("china.jpg", "flower.jpg"):
        photo = Image.fromarray(load_sample_image(name))
        w, h = photo.size
        crops = [photo, photo.crop((w // 4, h // 4, 3 * w // 4, 3 * h // 4)), photo.crop((0, 0, h, h))]
        crops.append(photo.crop((w - h, 0, w, h)))
        images += crops + [ImageOps.mirror(photo)]
    return images


def timed_call(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one ``model(x)``."""
    wall, cpu = time.perf_counter(), time.process_time()
    model(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def macs_per_image(model: torch.nn.Module, x: torch.Tensor) -> float:
    return count_macs(model, x[:1])[0]


def bench_model(name: str, rs: list[str], args: argparse.Namespace, images: torch.Tensor) -> list[dict]:
    """Agreement and cost at every ``r``; timings interleave the rates over ``--repeats`` rounds and keep the best, so
    load from other processes biases every rate alike."""
    model = timm.create_model(name, pretrained=args.pretrained).eval().to(args.device)
    x = torch.randn(args.batch_size, *model.pretrained_cfg["input_size"], device=args.device)
    rates = [(r_arg, PAPER_R.get(name) if r_arg == "paper" else int(r_arg)) for r_arg in rs]
    rates = [(r_arg, r) for r_arg, r in rates if r is not None]
    rows = []
    with torch.inference_mode():
        reference = model(images.to(args.device)).float()
        for r_arg, r in rates:
            attnzoo.apply_token_merging(model, r=r)
            logits = model(images.to(args.device)).float()
            rows.append(
                dict(
                    model=name,
                    r=f"{r} (paper)" if r_arg == "paper" else str(r),
                    tokens=model.forward_features(x[:1]).shape[1],
                    gmacs=macs_per_image(model, x) / 1e9,
                    wall=float("inf"),
                    cpu=float("inf"),
                    top1_agree=(logits.argmax(-1) == reference.argmax(-1)).float().mean().item(),
                    cosine=F.cosine_similarity(logits, reference, dim=-1).mean().item(),
                    classes=reference.argmax(-1).unique().numel(),
                )
            )
            model(x)  # warm-up
        for _ in range(args.repeats):
            for (_, r), row in zip(rates, rows):
                attnzoo.apply_token_merging(model, r=r)
                wall, cpu = timed_call(model, x)
                row["wall"], row["cpu"] = min(row["wall"], wall), min(row["cpu"], cpu)
    for row in rows:
        row["img_s"], row["img_cpu_s"] = args.batch_size / row.pop("wall"), args.batch_size / row.pop("cpu")
        print(row, flush=True)
    attnzoo.remove_token_merging(model)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["deit_small_patch16_224", "vit_base_patch16_224"])
    parser.add_argument("--rs", nargs="+", default=["0", "8", "16", "paper"], help="merge rates; 'paper': paper's r")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="timing rounds (best kept)")
    parser.add_argument("--pretrained", action="store_true", help="load timm's weights (needs them reachable)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    photos = sample_images()
    rows = []
    for name in args.models:
        config = timm.data.resolve_data_config(model=timm.create_model(name, pretrained=False))
        transform = timm.data.create_transform(**config)
        images = torch.stack([transform(img) for img in photos])
        rows += bench_model(name, args.rs, args, images)

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(
        f"\n{date.today()}, {device}, {torch.get_num_threads()} threads, torch {torch.__version__}, timm "
        f"{timm.__version__}, batch {args.batch_size}, weights: {'pretrained' if args.pretrained else 'random init'}, "
        f"{len(photos)} images\n"
    )
    print("| model | r | tokens out | GMACs | img/s | speed-up | img/CPU-s | CPU speed-up | top-1 agree | cosine |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = {row["model"]: row for row in rows if row["r"] == "0"}
    for row in rows:
        ref = base.get(row["model"])
        wall_up = row["img_s"] / ref["img_s"] if ref else float("nan")
        cpu_up = row["img_cpu_s"] / ref["img_cpu_s"] if ref else float("nan")
        print(
            f"| `{row['model']}` | {row['r']} | {row['tokens']} | {row['gmacs']:.2f} | {row['img_s']:.2f} | "
            f"{wall_up:.2f}x | {row['img_cpu_s']:.2f} | {cpu_up:.2f}x | {row['top1_agree']:.2f} | {row['cosine']:.4f} |"
        )
    print(
        "\ndistinct top-1 classes of the unmerged model over the images: "
        + ", ".join(f"{name} {row['classes']}" for name, row in base.items())
    )


if __name__ == "__main__":
    main()
