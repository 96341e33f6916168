"""Atomic, symlink-safe local file writes: a crash while saving never leaves a truncated ``last.ckpt`` or export,
and a link planted in an output folder is never written through.

Files are written to a new hidden temporary file in the target's folder (``.<name>.attnzoo-<12 hex>.tmp``, created
exclusively and without following links, so an existing file or link of that name is never opened), synced and
renamed onto the target with ``os.replace``. A rename replaces a symbolic link at the target itself (the link goes,
the file it pointed to is untouched): whatever the folder held under that name, the result is a regular file written
by this process. Files are created like any other file (mode ``0o666`` less the umask). A ``kill -9`` during a write
can leave the temporary file behind: :func:`remove_stale_temp_files` deletes those, and only those (the CLI runs it
at start-up).
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "atomic_write", "remove_stale_temp_files", "temp_path"]

TEMP_SUFFIX = ".tmp"
TEMP_MARKER = ".attnzoo-"
_TEMP_NAME = re.compile(r"\..+" + re.escape(TEMP_MARKER) + r"[0-9a-f]{12}" + re.escape(TEMP_SUFFIX))
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh temporary name beside ``path``: ``.<name>.attnzoo-<12 hex>.tmp`` (what :func:`atomic_write` uses and
    :func:`remove_stale_temp_files` recognises)."""
    path = Path(path)
    return path.parent / f".{path.name}{TEMP_MARKER}{secrets.token_hex(6)}{TEMP_SUFFIX}"


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any] | bytes | str) -> Path:
    """Write ``path`` atomically: ``write`` (``write(file)`` on a binary file, or the ``bytes`` / UTF-8 ``str``
    content) goes to a new temporary file beside ``path`` (created with ``O_CREAT | O_EXCL | O_NOFOLLOW``), which is
    ``fsync``-ed and renamed onto ``path`` (atomic on POSIX within one filesystem). A symbolic link at ``path`` is
    replaced, never followed; the temporary file is removed if anything fails. Returns ``path``."""
    path = Path(path)
    if isinstance(write, str):
        write = write.encode("utf-8")
    if isinstance(write, bytes):
        content = write
        write = lambda f: f.write(content)  # noqa: E731
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        # the default mode honours the umask, unlike tempfile.mkstemp's 0o600
        with os.fdopen(os.open(tmp, _CREATE_FLAGS, 0o666), "wb") as f:
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
    ``*``: all) when its process was killed; returns the deleted paths. Only names of :func:`atomic_write`'s own
    pattern (``.<name>.attnzoo-<12 hex>.tmp``) are touched; a user's ``.notes.backup.tmp`` stays. Run it only while
    nothing writes there."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    candidates = folder.glob(f".{name}{TEMP_MARKER}*{TEMP_SUFFIX}")
    stale = sorted(p for p in candidates if _TEMP_NAME.fullmatch(p.name) and (p.is_file() or p.is_symlink()))
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
