"""Training augmentations of the COCO recipe, with ``torchvision.transforms.v2`` so boxes and masks follow the image.

- ``"resize"``: short side drawn from ``scales`` (long side capped at ``max_size``), then a horizontal flip.
- ``"detr_crop"``: the multi-scale crop augmentation of DETR that the NAT/DiNAT 3x and Agent-Swin configs train with
  (mmdetection's ``AutoAugment`` of two policies): a horizontal flip, then with equal chance either (a) the short side
  resized to one of ``scales`` (long side <= ``max_size``), or (b) the short side resized to one of ``crop_scales``,
  a random crop of height and width each drawn from ``crop_size`` (capped by the image), and the short side resized
  to one of ``scales``. Boxes are clipped to the crop; boxes (and their labels and masks) that the crop empties are
  dropped; an image may end up without boxes, as in mmdetection (``allow_negative_crop``).

Both end with float images in [0, 1] and drop boxes narrower or shorter than 1 pixel (``SanitizeBoundingBoxes``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision.transforms import v2

__all__ = ["AUGMENTATIONS", "DETR_CROP_SCALES", "DETR_CROP_SIZE", "RandomSizeCrop", "train_transform"]

AUGMENTATIONS = ("resize", "detr_crop")
DETR_CROP_SCALES = (400, 500, 600)
DETR_CROP_SIZE = (384, 600)


class RandomSizeCrop:
    """Crop a random ``(h, w)`` window, ``h`` and ``w`` each drawn uniformly from ``[min_size, max_size]`` (both
    capped by the image's size; mmdetection's ``RandomCrop(crop_type="absolute_range")``), at a random place.

    Called like a ``transforms.v2`` transform (``crop(image, target)``); the crop itself is ``v2.RandomCrop``, so
    boxes (clipped to the window) and masks are cropped with the image. Randomness from ``torch``'s generator.
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        if not 1 <= min_size <= max_size:
            raise ValueError(f"crop sizes must satisfy 1 <= min_size <= max_size, got {min_size}, {max_size}")
        self.min_size, self.max_size = int(min_size), int(max_size)

    def _draw(self, length: int) -> int:
        low, high = min(length, self.min_size), min(length, self.max_size)
        return int(torch.randint(low, high + 1, ()).item())

    def __call__(self, *inputs: Any) -> Any:
        sample = inputs[0]
        if len(inputs) == 1 and isinstance(sample, (tuple, list)):  # one (image, target) argument
            sample = sample[0]
        height, width = v2.functional.get_size(sample)
        crop = v2.RandomCrop((self._draw(height), self._draw(width)))
        return crop(*inputs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(min_size={self.min_size}, max_size={self.max_size})"


def train_transform(
    augment: str,
    scales: Sequence[int],
    max_size: int,
    hflip: float,
    crop_scales: Sequence[int] = DETR_CROP_SCALES,
    crop_size: Sequence[int] = DETR_CROP_SIZE,
) -> v2.Compose:
    """The training transform ``(PIL image, target) -> (float image (3, H, W), target)`` of ``augment``
    (``"resize"`` or ``"detr_crop"``, see the module docstring)."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}; got {augment!r}")
    resize = v2.RandomShortestSize(list(scales), max_size=max_size, antialias=True)
    if augment == "resize":
        steps = [resize, v2.RandomHorizontalFlip(hflip)]
    else:
        if len(crop_size) != 2:
            raise ValueError(f"crop_size must be [min, max], got {list(crop_size)}")
        crop = v2.Compose(
            [
                v2.RandomShortestSize(list(crop_scales), max_size=max_size, antialias=True),
                RandomSizeCrop(*crop_size),
                v2.RandomShortestSize(list(scales), max_size=max_size, antialias=True),
            ]
        )
        steps = [v2.RandomHorizontalFlip(hflip), v2.RandomChoice([resize, crop])]
    return v2.Compose(
        [v2.ToImage(), *steps, v2.ToDtype(torch.float32, scale=True), v2.SanitizeBoundingBoxes(min_size=1.0)]
    )
