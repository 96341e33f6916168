"""Benchmark Mask R-CNN inference per image on every zoo backbone family next to torchvision's ResNet-50 FPN.

For each backbone and input size (``800x1333``: COCO's test scale, ``1024x1024``), builds the detector with
:func:`attnzoo.recipes.detection.build_detector` (``fpn_channels`` 256, random weights; torchvision's
``maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)`` as the reference), sets ``min_size`` / ``max_size`` so
that the image is processed at exactly that size, and times ``model.eval()([image])`` under ``torch.inference_mode``
on one image (best of ``--repeats`` after a warm-up; wall clock and process CPU seconds). The image is a real photo
(scikit-learn's ``china.jpg``, resized). The score threshold is 0, so every model returns torchvision's
``box_detections_per_img`` = 100 detections and the mask head and mask pasting run on the same number of boxes
whatever the random weights score.

Peak memory (untimed forwards): on CUDA ``torch.cuda.max_memory_allocated``; on CPU the peak of live tensor storage
bytes allocated by ATen ops during the forward (weights excluded), tracked at op granularity with a
``TorchDispatchMode`` (op-internal scratch is not seen). Whole detector (at 800x1333 it is dominated by the 100
full-image mask probabilities, ~400 MiB in float32, the same for every backbone) and backbone + FPN alone on the
normalised, padded image.

    python benchmarks/bench_detection.py --threads 2 --repeats 1 --markdown
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import platform
import time
from functools import partial
from pathlib import Path

import numpy as np
import timm
import torch
import torchvision
from PIL import Image
from sklearn.datasets import load_sample_image
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models.detection import maskrcnn_resnet50_fpn

from attnzoo.recipes.detection import build_detector

BACKBONES = (
    "nat_tiny",
    "dinat_tiny",
    "biformer_small",
    "agent_pvt_small",
    "agent_swin_tiny",
    "metapool_hybrid_s12",
    "gated_vit_small_patch16_224",
)
REFERENCE = "torchvision_resnet50"
SIZES = ((800, 1333), (1024, 1024))  # (height, width)


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
        self.peak = max(self.peak, sum(nbytes for _, nbytes in self.live.values()))
        return out


def photo(height: int, width: int) -> torch.Tensor:
    """scikit-learn's ``china.jpg`` resized to ``(3, height, width)`` float in [0, 1]."""
    image = Image.fromarray(load_sample_image("china.jpg")).resize((width, height), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def build(name: str, height: int, width: int) -> torch.nn.Module:
    """Mask R-CNN on ``name`` whose transform keeps a ``height x width`` image at its size."""
    short, long = min(height, width), max(height, width)
    if name == REFERENCE:
        return maskrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, min_size=short, max_size=long, box_score_thresh=0.0
        )
    return build_detector(
        "mask_rcnn", name, 80, min_size=short, max_size=long, detector_kwargs={"box_score_thresh": 0.0}
    )


def peak_bytes(call, device: torch.device) -> int:
    """Peak bytes allocated during ``call()`` above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        return torch.cuda.max_memory_allocated() - base
    with PeakTensorMemory() as tracker:
        call()
    return tracker.peak


def measure(name: str, height: int, width: int, repeats: int, device: torch.device) -> dict:
    model = build(name, height, width).eval().to(device)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    image = photo(height, width).to(device)
    times = []
    with torch.inference_mode():
        model([image])  # warm-up
        peak = peak_bytes(partial(model, [image]), device)
        batched = model.transform([image])[0].tensors  # normalised, padded to a multiple of 32
        backbone_peak = peak_bytes(partial(model.backbone, batched), device)
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            detections = model([image])
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start, time.process_time() - cpu_start))
    result = {
        "model": name,
        "size": f"{height}x{width}",
        "params_m": params,
        "seconds": min(t[0] for t in times),
        "cpu_seconds": min(t[1] for t in times),
        "peak_mib": peak / 2**20,
        "backbone_peak_mib": backbone_peak / 2**20,
        "detections": len(detections[0]["boxes"]),
    }
    del model
    gc.collect()
    return result


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model and its logical CPU count (``/proc/cpuinfo``), for a table's header."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.machine()
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        cpu = f"{names[0]} ({len(names)} logical CPUs)" if names else cpu
    return cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=[REFERENCE, *BACKBONES], help="zoo backbones or " + REFERENCE)
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
        f"# {datetime.date.today()} | {cpu} | torch {torch.__version__} | torchvision {torchvision.__version__} | "
        f"timm {timm.__version__} | device {device} | threads {args.threads} | repeats {args.repeats}",
        flush=True,
    )
    if args.markdown:
        print(
            "| backbone | params (M) | size (HxW) | forward s / image | process CPU s | peak MiB | "
            "backbone+FPN peak MiB | detections |"
        )
        print("|---|---:|---|---:|---:|---:|---:|---:|", flush=True)
    for name in args.models:
        for height, width in sizes:
            r = measure(name, height, width, args.repeats, device)
            if args.markdown:
                print(
                    f"| {r['model']} | {r['params_m']:.1f} | {r['size']} | {r['seconds']:.2f} | "
                    f"{r['cpu_seconds']:.2f} | {r['peak_mib']:.0f} | {r['backbone_peak_mib']:.0f} | "
                    f"{r['detections']} |",
                    flush=True,
                )
            else:
                print(r, flush=True)


if __name__ == "__main__":
    main()
