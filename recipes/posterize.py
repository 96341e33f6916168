"""RandAugment's posterize ops, safe on every Pillow.

timm's ``PosterizeIncreasing`` asks Pillow to keep 0 bits at magnitude 10 (``4 - int(level / 10 * 4)``), and
``Posterize`` does at magnitudes below 2.5. Pillow < 13 returned an all-black image there (every value ``& ~255``);
Pillow 13 raises ``ValueError: bits must be between or equal to 1 and 8``, which ends a training run within a few
hundred images of ``rand-m9-mstd0.5-inc1``. :func:`safe_posterize` returns the old all-black result for 0 bits and is
timm's ``posterize`` otherwise; :func:`patch_posterize` puts it into every posterize op of a timm transform.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from PIL import Image
from timm.data.auto_augment import AugmentOp, posterize

__all__ = ["augment_ops", "patch_posterize", "safe_posterize"]

POSTERIZE_OPS = ("Posterize", "PosterizeIncreasing", "PosterizeOriginal")


def safe_posterize(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's ``posterize``, with ``bits_to_keep <= 0`` giving the all-black image of Pillow < 13 (same mode/size)."""
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return posterize(img, bits_to_keep, **kwargs)


def augment_ops(transform: Any) -> Iterator[AugmentOp]:
    """Every timm ``AugmentOp`` inside ``transform``: ``Compose.transforms``, ``RandAugment.ops``, ``AugMixAugment.ops``
    and ``AutoAugment.policy`` (lists of ops), at any depth."""
    if isinstance(transform, AugmentOp):
        yield transform
        return
    if isinstance(transform, (list, tuple)):
        for item in transform:
            yield from augment_ops(item)
        return
    for attribute in ("transforms", "ops", "policy"):
        children = getattr(transform, attribute, None)
        if isinstance(children, (list, tuple)):
            yield from augment_ops(children)


def patch_posterize(transform: Any) -> Any:
    """Make every posterize op of ``transform`` use :func:`safe_posterize` (in place); returns ``transform``."""
    for op in augment_ops(transform):
        if op.name in POSTERIZE_OPS:
            op.aug_fn = safe_posterize
    return transform
