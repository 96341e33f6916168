"""Atomic local file writes: a crash while saving never leaves a truncated ``last.ckpt`` or export.

Files are written to a hidden temporary file in the target's folder (``.<name>.<random>.tmp``), synced and renamed
onto the target; they are created like any other file (mode ``0o666`` less the umask). A ``kill -9`` during a write
can leave the temporary file behind: :func:`remove_stale_temp_files` deletes them (the CLI runs it at start-up).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "atomic_write", "remove_stale_temp_files"]

TEMP_SUFFIX = ".tmp"


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(file)`` on a new temporary file beside ``path``, ``fsync`` it and rename it onto ``path`` (atomic
    on POSIX within one filesystem); the temporary file is removed if anything fails. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}"
    try:
        with open(tmp, "xb") as f:  # default mode: honours the umask, unlike tempfile.mkstemp's 0o600
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def remove_stale_temp_files(folder: str | os.PathLike, name: str = "*") -> list[Path]:
    """Delete the temporary files :func:`atomic_write` left in ``folder`` for targets matching ``name`` (a glob;
    ``*``: all) when its process was killed; returns the deleted paths. Run it only while nothing writes there."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = sorted(p for p in folder.glob(f".{name}.*{TEMP_SUFFIX}") if p.is_file())
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` through :func:`atomic_write`. Remote paths (``s3://`` ...) use Lightning's default writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        path = os.fspath(path)
        if "://" in path and not path.startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = os.path.abspath(path.removeprefix("file://"))
        get_filesystem(path).makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, lambda f: torch.save(checkpoint, f))
