"""The output folder of ``attnzoo convert``: assembled beside its final path and renamed into place when complete.

Nothing is left behind when a conversion fails; the folder gets the umask's permissions (``tempfile.mkdtemp`` would
make it 0700); an output path that is a symbolic link is refused (the rename would replace the link).
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["check_output_folder", "staged_output_folder"]


def check_output_folder(out: Path) -> None:
    """ValueError when ``out`` is a symbolic link; FileExistsError when it exists and is not an empty folder."""
    if out.is_symlink():
        raise ValueError(
            f"--out {out} is a symbolic link (to {os.readlink(out)}); the converted folder is renamed into place, "
            "which would replace the link: pass a new folder path (or the link's target, if it is an empty folder)"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose a new output folder")


def _new_folder(parent: Path, prefix: str) -> Path:
    """A new empty folder ``<parent>/<prefix><random>.tmp`` with the umask's permissions."""
    while True:
        folder = parent / f"{prefix}{secrets.token_hex(6)}.tmp"
        try:
            folder.mkdir(mode=0o777)
            return folder
        except FileExistsError:
            continue


@contextmanager
def staged_output_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty folder beside ``out`` (checked with :func:`check_output_folder`) that is renamed to ``out``
    when the block completes; it is removed, and ``out`` untouched, when the block raises."""
    out = Path(out)
    check_output_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = _new_folder(out.parent, f".{out.name}.")
    try:
        yield staging
        if out.exists():
            out.rmdir()
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
