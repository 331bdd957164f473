"""Write files so that a reader sees either the old version or the new one, never half of the new one.

A job killed while writing a checkpoint (SLURM time limit, OOM killer, node failure) must leave the previous
checkpoint readable.  The recipe: write a temporary file in the destination's folder (same file system, so the
rename is atomic), fsync it, ``os.replace`` it over the destination, then fsync the folder so the rename itself is
durable.
"""
from __future__ import annotations

import contextlib
import os

__all__ = ["atomic_path", "fsync_path", "output_folder_problem"]


def fsync_path(path: str) -> None:
    """Flush a file's (or a folder's) data and metadata to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path: str) -> str:
    """Return the temporary file name used while ``path`` is written: hidden, beside it, one per destination.

    One fixed name per destination means a write killed half-way leaves one stale file that the next write
    overwrites, instead of an ever-growing pile.
    """
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.tmp")


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path to write; on success fsync it and rename it over ``path``, else remove it.

    The caller must have closed the file by the end of the ``with`` block.  Raises FileNotFoundError (with the
    folder named) if the destination folder does not exist.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path}: folder {folder} does not exist; create it first")
    tmp = temporary_name(path)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # The rename is durable only once the folder's entry is on disk too.
    with contextlib.suppress(OSError):  # some file systems refuse to open folders; the rename still happened
        fsync_path(folder)


def output_folder_problem(path) -> str | None:
    """Why a file could not be written at ``path`` (its folder is missing or not writable), or None: commands check
    their outputs with it before any work, so a bad path is a usage error and not a lost result at the end."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"folder {folder} does not exist"
    if not os.access(folder, os.W_OK):
        return f"folder {folder} is not writable"
    return None
