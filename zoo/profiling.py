"""``attnzoo profile``: build every zoo model, run it on a real photo and report params / GFLOPs / CPU latency.

The photo is scikit-learn's ``china.jpg`` (or ``flower.jpg``), read from the installed package files, so the demo
needs no download. GFLOPs are multiply-accumulates counted by :func:`attnzoo.kernels.flops.count_macs` (the fvcore
convention of the papers' tables; the same count on every supported torch version).
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from PIL import Image

from ._registry import list_models
from .kernels.flops import count_macs

SAMPLE_IMAGES = ("china.jpg", "flower.jpg")


def sample_image_path(name: str = "china.jpg") -> Path:
    """Path of a photo shipped inside the scikit-learn wheel (``sklearn/datasets/images``)."""
    if name not in SAMPLE_IMAGES:
        raise ValueError(f"sample image must be one of {SAMPLE_IMAGES}, got {name!r}")
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-learn is not installed; it ships the demo photos (pip install scikit-learn)")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "images" / name
    if not path.is_file():
        raise FileNotFoundError(f"sample image not found at {path}")
    return path


@dataclass
class ModelReport:
    name: str
    params_m: float
    gmacs: float
    latency_ms: float
    input_size: tuple[int, ...]
    output_shape: tuple[int, ...]


def profile_model(name: str, image: Image.Image, repeats: int = 3) -> ModelReport:
    """Build ``name``, preprocess ``image`` with its timm data config, count MACs and time a forward pass."""
    model = timm.create_model(name).eval()
    config = timm.data.resolve_data_config(model=model)
    x = timm.data.create_transform(**config)(image).unsqueeze(0)
    macs, out = count_macs(model, x)
    if not torch.isfinite(out).all():
        raise RuntimeError(f"{name} produced non-finite outputs")
    with torch.inference_mode():
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return ModelReport(
        name=name,
        params_m=sum(p.numel() for p in model.parameters()) / 1e6,
        gmacs=macs / 1e9,
        latency_ms=statistics.median(times) * 1e3,
        input_size=tuple(x.shape[1:]),
        output_shape=tuple(out.shape),
    )


def format_table(reports: list[ModelReport]) -> str:
    header = f"{'model':<36} {'params (M)':>10} {'GFLOPs':>8} {'CPU ms':>8}  {'input':<14} output"
    lines = [header, "-" * len(header)]
    for r in reports:
        size = "x".join(map(str, r.input_size))
        lines.append(
            f"{r.name:<36} {r.params_m:>10.2f} {r.gmacs:>8.2f} {r.latency_ms:>8.1f}  {size:<14} {r.output_shape}"
        )
    return "\n".join(lines)


def run_profile(pattern: str = "", image: str | None = None, repeats: int = 3) -> list[ModelReport]:
    """Profile every zoo model matching ``pattern`` on ``image`` (default: scikit-learn's china.jpg) and print a
    table."""
    path = Path(image) if image else sample_image_path()
    names = list_models(pattern)
    if not names:
        raise ValueError(f"no attnzoo model matches {pattern!r}; see `attnzoo models`")
    photo = Image.open(path).convert("RGB")
    print(
        f"attnzoo profile: {len(names)} models on {path.name} ({photo.width}x{photo.height}), "
        f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}, timm {timm.__version__}"
    )
    reports = []
    for name in names:
        reports.append(profile_model(name, photo, repeats=repeats))
        print(f"  {name}: ok", flush=True)
    print(format_table(reports))
    return reports
