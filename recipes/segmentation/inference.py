"""Test-time inference as mmseg does it: keep-ratio resize to the test scale, whole-image or sliding-window logits,
optional multi-scale + flip, probabilities at the original image size.

- Whole image: the model's logits at the resized image's size, resized bilinearly to the original size.
- Sliding window (crop ``(h_c, w_c)``, stride ``(h_s, w_s)``): ``max(H - h_c + h_s - 1, 0) // h_s + 1`` rows of
  windows (likewise columns), the last ones flush with the bottom/right border, each window's logits added in
  place and divided by the number of windows covering each pixel.
- ``size_divisor``: the resized image is resized once more, up to the next multiple (UniFormer's ``AlignResize``,
  used by BiFormer's Semantic FPN).
- Multi-scale: for every ratio ``r``, the test scale times ``r`` (the original size times ``r`` without a test
  scale); with ``flip``, each scale also mirrored. The softmax probabilities (at the original size, flipped back)
  are averaged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .heads import resize

__all__ = ["MODES", "rescale_size", "segment_image", "slide_logits"]

MODES = ("whole", "slide")


def rescale_size(height: int, width: int, scale: Sequence[int]) -> tuple[int, int]:
    """``(h, w)`` of an image ``height x width`` rescaled, aspect kept, to fit ``scale`` (mmcv's ``imrescale``: the
    long side at most ``max(scale)``, the short side at most ``min(scale)``, whichever binds)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def slide_logits(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    num_classes: int,
    crop_size: Sequence[int],
    stride: Sequence[int],
) -> torch.Tensor:
    """Sliding-window logits ``(B, num_classes, H, W)`` of ``images`` ``(B, 3, H, W)``; ``logits_fn`` maps a window
    ``(B, 3, h, w)`` to its logits ``(B, num_classes, h, w)``."""
    (crop_h, crop_w), (stride_h, stride_w) = crop_size, stride
    if min(crop_h, crop_w, stride_h, stride_w) < 1:
        raise ValueError(f"crop_size and stride must be positive, got {tuple(crop_size)} and {tuple(stride)}")
    batch, _, height, width = images.shape
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    total = images.new_zeros(batch, num_classes, height, width)
    count = images.new_zeros(1, 1, height, width)
    for row in range(rows):
        for col in range(cols):
            y1, x1 = row * stride_h, col * stride_w
            y2, x2 = min(y1 + crop_h, height), min(x1 + crop_w, width)
            y1, x1 = max(y2 - crop_h, 0), max(x2 - crop_w, 0)
            total[:, :, y1:y2, x1:x2] += logits_fn(images[:, :, y1:y2, x1:x2])
            count[:, :, y1:y2, x1:x2] += 1
    return total / count


@torch.no_grad()
def segment_image(
    model: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    num_classes: int,
    *,
    mode: str = "whole",
    test_scale: Sequence[int] | None = (2048, 512),
    crop_size: Sequence[int] = (512, 512),
    stride: Sequence[int] = (341, 341),
    ratios: Sequence[float] = (1.0,),
    flip: bool = False,
    size_divisor: int | None = None,
) -> torch.Tensor:
    """Class probabilities ``(num_classes, H, W)`` of one image ``(3, H, W)`` in [0, 1]. ``model`` maps images
    ``(1, 3, h, w)`` to logits ``(1, num_classes, h, w)`` (a :class:`~.build.Segmenter`)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got shape {tuple(image.shape)}")
    if not ratios or any(r <= 0 for r in ratios):
        raise ValueError(f"ratios must be a non-empty list of positive numbers, got {list(ratios)}")
    height, width = image.shape[-2:]
    probs = image.new_zeros(num_classes, height, width)
    for ratio in ratios:
        if test_scale is not None:
            size = rescale_size(height, width, [int(s * ratio) for s in test_scale])
        else:
            size = (int(height * ratio + 0.5), int(width * ratio + 0.5))
        if size_divisor:
            size = tuple(-(-s // size_divisor) * size_divisor for s in size)
        scaled = resize(image[None], size)
        for flipped in (False, True) if flip else (False,):
            x = scaled.flip(-1) if flipped else scaled
            logits = model(x) if mode == "whole" else slide_logits(model, x, num_classes, crop_size, stride)
            p = F.softmax(resize(logits, (height, width)), dim=1)[0]
            probs += p.flip(-1) if flipped else p
    return probs / (len(ratios) * (2 if flip else 1))
