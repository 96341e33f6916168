"""Benchmark UperNet inference per image on every zoo backbone family next to timm's Swin-T and ConvNeXt-T.

For each backbone and input size (``512x512``: the ADE20K crop; ``512x2048``: the long side of the test scale),
builds the ADE20K UperNet with :func:`attnzoo.recipes.segmentation.build_segmenter` (150 classes, UPerHead 512
channels, auxiliary head built but not run at inference; **random weights**) with the backbone kwargs of the shipped
ADE20K config of that backbone (``recipes/configs/ade20k/``: the official downstream options), and times one whole-image
forward ``model(image)`` (logits at the input size) under ``torch.inference_mode`` (best of ``--repeats``; wall clock
and process CPU seconds). The image is a real photo (scikit-learn's ``china.jpg``, resized). Peak memory is measured
as in ``bench_detection.py`` (CUDA: ``max_memory_allocated``; CPU: the peak of live tensor storage allocated by ATen
ops during the forward, weights excluded), for the whole model and for the backbone alone (at these sizes the
UperNet head's stride-4 concatenation and the full-size logits dominate the whole model's peak).

    python benchmarks/bench_segmentation.py --threads 2 --markdown
"""

from __future__ import annotations

import argparse
import datetime
import gc
import time
from functools import partial

import timm
import torch
import yaml
from bench_detection import device_name, peak_bytes, photo

from attnzoo.recipes.cli import CONFIG_DIR
from attnzoo.recipes.segmentation import build_segmenter

BACKBONES = ("nat_tiny", "dinat_tiny", "biformer_small", "agent_swin_tiny", "agent_pvt_small")
REFERENCES = {"swin_tiny_patch4_window7_224": {"strict_img_size": False}, "convnext_tiny": {}}
SIZES = ((512, 512), (512, 2048))  # (height, width)


def backbone_kwargs(name: str) -> dict:
    """The backbone kwargs of the shipped ADE20K config of ``name`` (UperNet first, else Semantic FPN), without drop
    path; the timm references' own size options."""
    if name in REFERENCES:
        return dict(REFERENCES[name])
    for path in sorted((CONFIG_DIR / "ade20k").glob(f"*_{name}_*.yaml"), reverse=True):  # upernet_ before fpn_
        kwargs = yaml.safe_load(path.read_text())["model"].get("backbone_kwargs") or {}
        return {k: v for k, v in kwargs.items() if k != "drop_path_rate"}
    return {}


def measure(name: str, height: int, width: int, repeats: int, device: torch.device) -> dict:
    model = build_segmenter("upernet", name, 150, **backbone_kwargs(name)).eval().to(device)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    image = photo(height, width).to(device)[None]
    times = []
    with torch.inference_mode():
        model(image)  # warm-up (the agent models cache their resized bias tables per input size)
        peak = peak_bytes(partial(model, image), device)
        backbone_peak = peak_bytes(partial(model.features, image), device)
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            logits = model(image)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start, time.process_time() - cpu_start))
    assert logits.shape == (1, 150, height, width)
    result = {
        "model": name,
        "size": f"{height}x{width}",
        "params_m": params,
        "seconds": min(t[0] for t in times),
        "cpu_seconds": min(t[1] for t in times),
        "peak_mib": peak / 2**20,
        "backbone_peak_mib": backbone_peak / 2**20,
    }
    del model
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=[*REFERENCES, *BACKBONES], help="timm / zoo backbones")
    parser.add_argument("--sizes", nargs="+", default=[f"{h}x{w}" for h, w in SIZES], help="HEIGHTxWIDTH")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=1, help="timed forwards per model and size (best kept)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes]
    cpu = device_name(device)
    print(
        f"# {datetime.date.today()} | {cpu} | torch {torch.__version__} | timm {timm.__version__} | device {device} | "
        f"threads {args.threads} | repeats {args.repeats}",
        flush=True,
    )
    if args.markdown:
        print(
            "| backbone | UperNet params (M) | size (HxW) | forward s / image | process CPU s | peak MiB | "
            "backbone peak MiB |"
        )
        print("|---|---:|---|---:|---:|---:|---:|", flush=True)
    for name in args.models:
        for height, width in sizes:
            r = measure(name, height, width, args.repeats, device)
            if args.markdown:
                print(
                    f"| `{r['model']}` | {r['params_m']:.1f} | {r['size']} | {r['seconds']:.2f} | "
                    f"{r['cpu_seconds']:.2f} | {r['peak_mib']:.0f} | {r['backbone_peak_mib']:.0f} |",
                    flush=True,
                )
            else:
                print(r, flush=True)


if __name__ == "__main__":
    main()
