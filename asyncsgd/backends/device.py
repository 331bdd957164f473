"""Which devices this rank can use, and CuPy imported in one place.

``cupy_importable()`` says whether CuPy can be imported; ``gpu_count()`` whether a GPU is usable.  These are
different questions: CuPy installs happily on machines without a driver.  Every module of ``asyncsgd.backends``
imports without CuPy and asks ``import_cupy()`` when it needs it.
"""
from __future__ import annotations

import functools

__all__ = ["BackendError", "DEVICES", "import_cupy", "cupy_importable", "gpu_count"]

DEVICES = ("cpu", "gpu", "auto")


class BackendError(RuntimeError):
    """A device was asked for that this rank cannot provide."""


@functools.lru_cache(maxsize=None)
def import_cupy():
    """Return the cupy module, or None when it does not import (not installed, or a CUDA library failing to load)."""
    try:
        import cupy  # noqa: F401
    except Exception:  # ImportError, or a CUDA library failing to load
        return None
    return cupy


def cupy_importable() -> bool:
    """Return True when ``import cupy`` succeeds."""
    return import_cupy() is not None


@functools.lru_cache(maxsize=None)
def gpu_count() -> int:
    """Return the number of usable CUDA devices (0 without CuPy, a driver or a device)."""
    cupy = import_cupy()
    if cupy is None:
        return 0
    try:
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0
