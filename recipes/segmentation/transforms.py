"""Training augmentation of the ADE20K recipes (mmseg's pipeline), on ``tv_tensors`` with ``transforms.v2``.

:class:`SegmentationTrainTransform` applies, to an image ``tv_tensors.Image`` ``(3, H, W)`` uint8 and its mask
``tv_tensors.Mask`` ``(H, W)`` int64 together (v2's functional ops resize masks with nearest neighbours):

1. keep-ratio resize to ``scale`` times a ratio drawn uniformly from ``ratio_range`` (mmseg ``Resize(img_scale=
   (2048, 512), ratio_range=(0.5, 2.0))``: long side <= 2048 r, short side <= 512 r; bilinear without antialiasing,
   as OpenCV's resize);
2. a random ``crop_size`` crop, redrawn (up to 10 times) while one class covers ``cat_max_ratio`` or more of its
   labelled pixels or fewer than two classes are present;
3. horizontal flip with probability ``hflip``;
4. mmseg's ``PhotoMetricDistortion`` (each with probability 0.5: brightness +-32/255, contrast x[0.5, 1.5] before or
   after the HSV part, saturation x[0.5, 1.5], hue +-18 of OpenCV's 180 steps), on floats in [0, 1];
5. padding to ``crop_size`` at the bottom/right: the image with ``fill`` (the normalisation mean, which becomes 0
   after normalisation, as mmseg pads normalised images with 0), the mask with ``ignore_index``.

Random draws come from torch's global generator (seeded per item by the data module).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from .inference import rescale_size

__all__ = ["PhotoMetricDistortion", "SegmentationTrainTransform", "cat_max_crop"]


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def _chance(p: float = 0.5) -> bool:
    return bool(torch.rand(()) < p)


class PhotoMetricDistortion:
    """mmseg's ``PhotoMetricDistortion`` on a float image ``(3, H, W)`` in [0, 1] (clipped after every step):
    brightness ``x + U(-delta, delta)``, contrast ``x * U(0.5, 1.5)``, saturation (HSV ``S * U(0.5, 1.5)``, capped at
    1), hue (HSV ``H + U{-18..18} / 180`` turns); each with probability 0.5, contrast first or last at random."""

    def __init__(
        self,
        brightness_delta: float = 32 / 255,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: int = 18,
    ) -> None:
        self.brightness_delta, self.contrast_range = brightness_delta, contrast_range
        self.saturation_range, self.hue_delta = saturation_range, hue_delta

    @staticmethod
    def scale_saturation(image: torch.Tensor, alpha: float) -> torch.Tensor:
        """HSV saturation times ``alpha`` (capped at 1), hue and value kept: ``c' = V - a (V - c)`` per channel with
        ``V = max_c``, ``a = min(alpha, V / (V - min_c))``."""
        value = image.amax(0, keepdim=True)
        spread = value - image.amin(0, keepdim=True)
        cap = torch.where(spread > 0, value / spread.clamp(min=1e-12), torch.full_like(value, alpha))
        return value - torch.minimum(cap, torch.full_like(cap, alpha)) * (value - image)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if _chance():
            image = (image + _uniform(-self.brightness_delta, self.brightness_delta)).clamp(0, 1)
        contrast_first = _chance()

        def contrast(x: torch.Tensor) -> torch.Tensor:
            return (x * _uniform(*self.contrast_range)).clamp(0, 1) if _chance() else x

        if contrast_first:
            image = contrast(image)
        if _chance():
            image = self.scale_saturation(image, _uniform(*self.saturation_range)).clamp(0, 1)
        if _chance():
            shift = int(torch.randint(-self.hue_delta, self.hue_delta + 1, ()))
            image = F.adjust_hue(image, shift / 180)
        if not contrast_first:
            image = contrast(image)
        return image


def cat_max_crop(
    mask: torch.Tensor, crop_size: Sequence[int], cat_max_ratio: float, ignore_index: int, tries: int = 10
) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of a random crop of ``crop_size`` (clipped to the mask ``(H, W)``). With
    ``cat_max_ratio < 1`` a draw is checked up to ``tries`` times and redrawn when fewer than two classes are present
    or one covers ``cat_max_ratio`` or more of the crop's labelled pixels (mmseg's ``RandomCrop``: the draw after the
    last failed check is kept unchecked)."""
    height, width = mask.shape[-2:]
    crop_h, crop_w = min(crop_size[0], height), min(crop_size[1], width)

    def draw() -> tuple[int, int]:
        return int(torch.randint(0, height - crop_h + 1, ())), int(torch.randint(0, width - crop_w + 1, ()))

    top, left = draw()
    for _ in range(tries if cat_max_ratio < 1.0 else 0):
        window = mask[..., top : top + crop_h, left : left + crop_w]
        _, counts = torch.unique(window[window != ignore_index], return_counts=True)
        if len(counts) > 1 and int(counts.max()) < cat_max_ratio * int(counts.sum()):
            break
        top, left = draw()
    return top, left, crop_h, crop_w


class SegmentationTrainTransform:
    """The training pipeline above: ``(tv_tensors.Image (3, H, W) uint8, tv_tensors.Mask (H, W))`` ->
    ``(image (3, h, w) float32 in [0, 1], mask (h, w) int64)`` with ``(h, w) = crop_size``.

    ``scale=None`` skips the resize (``ratio_range`` then scales the image's own size); ``photometric=False`` skips
    the colour distortion."""

    def __init__(
        self,
        crop_size: Sequence[int] = (512, 512),
        scale: Sequence[int] | None = (2048, 512),
        ratio_range: Sequence[float] | None = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        hflip: float = 0.5,
        photometric: bool = True,
        fill: Sequence[float] = (0.485, 0.456, 0.406),
        ignore_index: int = 255,
    ) -> None:
        if len(crop_size) != 2 or min(crop_size) < 1:
            raise ValueError(f"crop_size must be (height, width) > 0, got {crop_size}")
        if ratio_range is not None and not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(f"ratio_range must be (low, high) with 0 < low <= high, got {ratio_range}")
        if scale is not None and (len(scale) != 2 or min(scale) < 1):
            raise ValueError(f"scale must be two positive sizes (e.g. (2048, 512)) or None, got {scale}")
        if not 0.0 < cat_max_ratio <= 1.0:
            raise ValueError(f"cat_max_ratio must be in (0, 1], got {cat_max_ratio}")
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip must be a probability in [0, 1], got {hflip}")
        self.crop_size, self.scale, self.ratio_range = tuple(crop_size), scale, ratio_range
        self.cat_max_ratio, self.hflip, self.ignore_index = cat_max_ratio, hflip, ignore_index
        self.photometric = PhotoMetricDistortion() if photometric else None
        self.fill = [float(v) for v in fill]

    def _size(self, height: int, width: int) -> tuple[int, int]:
        ratio = _uniform(*self.ratio_range) if self.ratio_range is not None else 1.0
        if self.scale is not None:
            return rescale_size(height, width, [int(s * ratio) for s in self.scale])
        return int(height * ratio + 0.5), int(width * ratio + 0.5)

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask) -> tuple[torch.Tensor, torch.Tensor]:
        size = self._size(*image.shape[-2:])
        if size != tuple(image.shape[-2:]):
            image = F.resize(image, list(size), interpolation=InterpolationMode.BILINEAR, antialias=False)
            mask = F.resize(mask, list(size))  # a Mask: nearest neighbours
        top, left, height, width = cat_max_crop(mask, self.crop_size, self.cat_max_ratio, self.ignore_index)
        image, mask = F.crop(image, top, left, height, width), F.crop(mask, top, left, height, width)
        if _chance(self.hflip):
            image, mask = F.horizontal_flip(image), F.horizontal_flip(mask)
        image = F.to_dtype(image, torch.float32, scale=True)
        if self.photometric is not None:
            image = tv_tensors.wrap(self.photometric(image.as_subclass(torch.Tensor)), like=image)
        pad = [0, 0, self.crop_size[1] - width, self.crop_size[0] - height]  # left, top, right, bottom
        if pad[2] or pad[3]:
            image = F.pad(image, pad, fill=self.fill)
            mask = F.pad(mask, pad, fill=self.ignore_index)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)
