"""RandAugment's 0-bit posterize on the Pillow a fresh install resolves (Pillow >= 13 raises for 0 bits)."""

import random

import numpy as np
import pytest
import timm.data
import torch
from PIL import Image
from timm.data.auto_augment import AugmentOp

from attnzoo.recipes import ImageDataModule
from attnzoo.recipes.posterize import augment_ops, patch_posterize, safe_posterize


def _photo(mode: str = "RGB", size: int = 48) -> Image.Image:
    pixels = np.random.default_rng(0).integers(1, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_zero_bit_posterize_gives_the_black_image_of_older_pillow(mode):
    op = patch_posterize(AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10))
    out = op(_photo(mode))
    assert out.mode == mode and out.size == (48, 48)
    assert not np.asarray(out).any()  # Pillow < 13: every value & ~(2**8 - 1) == 0


def test_safe_posterize_keeps_timm_posterize_for_1_to_8_bits():
    image = _photo()
    for bits in range(1, 9):
        expected = np.asarray(image) & (0xFF << (8 - bits) & 0xFF)
        assert np.array_equal(np.asarray(safe_posterize(image, bits)), expected)


def test_training_transform_survives_every_posterize_draw():
    """The recipe's RandAugment with magnitude 10 and 20 ops per image draws PosterizeIncreasing (0 bits) many
    times over 30 images; unpatched, Pillow 13 raises on the first."""
    datamodule = ImageDataModule(auto_augment="rand-m10-n20-mstd0-inc1")
    transform = datamodule.train_transform(timm.data.resolve_data_config({"input_size": (3, 64, 64)}))
    names = {op.name for op in augment_ops(transform)}
    assert "PosterizeIncreasing" in names
    random.seed(0)
    torch.manual_seed(0)
    for _ in range(30):
        assert transform(_photo(size=80)).shape == (3, 64, 64)
