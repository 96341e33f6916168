"""Safe checkpoint reading: safetensors, or ``torch.load(weights_only=True)`` — never arbitrary unpickling."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

_WRAPPER_KEYS = ("state_dict", "model", "models", "module")  # "models": PPMA's DeiT-style training checkpoints


def unwrap_state_dict(checkpoint: Mapping, keys: tuple[str, ...] = _WRAPPER_KEYS) -> dict[str, torch.Tensor]:
    """Return the tensor mapping inside a training checkpoint (``{"model": ...}``, ``{"state_dict": ...}``, ...),
    stripping a DDP ``module.`` prefix."""
    state = checkpoint
    for key in keys:
        inner = state.get(key) if isinstance(state, Mapping) else None
        if isinstance(inner, Mapping):
            state = inner
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint holds no state dict (type {type(state).__name__})")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"checkpoint holds no tensors under any of {keys}; top-level keys: {list(checkpoint)[:10]}")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def is_safetensors_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a safetensors file, by its content (whatever its name ends with): an 8-byte
    little-endian header length that fits the file, then a JSON header starting with ``{``."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size


def load_state_dict_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read the tensors of a safetensors file (recognised by its content, whatever its name) or of a PyTorch
    checkpoint (``torch.load(weights_only=True)``).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a file that is not a weights-only
    checkpoint (for instance one that pickles arbitrary objects).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if is_safetensors_file(path):  # by content: a safetensors file named .pth is still one
        from safetensors.torch import load_file

        return load_file(path, device=str(map_location))
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError/RuntimeError for disallowed globals
        raise ValueError(
            f"{path} is not a weights-only checkpoint and is not unpickled for safety ({type(err).__name__}: "
            f"{str(err).splitlines()[0]}); convert it to .safetensors first"
        ) from err
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict")
    return unwrap_state_dict(checkpoint)
