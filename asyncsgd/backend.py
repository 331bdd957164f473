"""Choose the array module of a rank once, and resolve optional imports in one place.

``cupy_importable()`` says whether CuPy can be imported; ``gpu_count()`` whether a GPU is usable.  These are
different questions: CuPy installs happily on machines without a driver.
"""
from __future__ import annotations

import functools
import os

import numpy

__all__ = ["Backend", "BackendError", "cupy_importable", "gpu_count", "select_backend", "DEVICES"]

DEVICES = ("cpu", "gpu", "auto")


class BackendError(RuntimeError):
    """A device was asked for that this rank cannot provide."""


@functools.lru_cache(maxsize=None)
def _import_cupy():
    try:
        import cupy  # noqa: F401
    except Exception:  # ImportError, or a CUDA library failing to load
        return None
    return cupy


def cupy_importable() -> bool:
    """Return True when ``import cupy`` succeeds."""
    return _import_cupy() is not None


@functools.lru_cache(maxsize=None)
def gpu_count() -> int:
    """Return the number of usable CUDA devices (0 without CuPy, a driver or a device)."""
    cupy = _import_cupy()
    if cupy is None:
        return 0
    try:
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


class Backend:
    """The array module of one rank and the moves between it and host memory.

    ``xp`` is numpy on CPU ranks and cupy on GPU ranks.  ``to_host`` returns a numpy array (a copy only when the data
    lives on a GPU); ``to_device`` the reverse.
    """

    def __init__(self, name: str, xp, device_id: int | None = None):
        self.name = name
        self.xp = xp
        self.device_id = device_id

    @property
    def is_gpu(self) -> bool:
        return self.name == "gpu"

    def to_host(self, a, out=None):
        """Return ``a`` as a numpy array, copied into ``out`` (a numpy array, pinned or not) when given."""
        if self.is_gpu:
            if out is not None:
                a.get(out=out)
                return out
            return a.get()
        if out is not None:
            numpy.copyto(out, a)
            return out
        return a

    def to_device(self, a, out=None):
        """Return host array ``a`` in this backend's memory (into ``out`` when given)."""
        if self.is_gpu:
            if out is not None:
                out.set(a)
                return out
            return self.xp.asarray(a)
        if out is not None:
            numpy.copyto(out, a)
            return out
        return a

    def synchronize(self):
        """Wait for queued device work (a no-op on CPU)."""
        if self.is_gpu:
            self.xp.cuda.get_current_stream().synchronize()

    def __repr__(self):
        dev = "" if self.device_id is None else f", device={self.device_id}"
        return f"Backend({self.name!r}{dev})"


def select_backend(device: str = "cpu", local_rank: int = 0) -> Backend:
    """Return the backend for ``device`` ('cpu', 'gpu' or 'auto').

    A GPU rank binds device ``local_rank % gpu_count()``, so several ranks of a node may share one GPU.
    ``local_rank`` is the rank in the node-local communicator (``comm.Split_type(MPI.COMM_TYPE_SHARED)``).
    ``'gpu'`` without a usable GPU raises BackendError; ``'auto'`` falls back to the CPU.
    """
    if device not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if os.environ.get("ASYNCSGD_FORCE_CPU") == "1" and device == "auto":
        device = "cpu"
    if device == "cpu":
        return Backend("cpu", numpy)
    n = gpu_count()
    if n == 0:
        if device == "auto":
            return Backend("cpu", numpy)
        why = "CuPy is not installed (pip install 'asyncsgd[gpu]')" if not cupy_importable() else \
            "CuPy imports but finds no usable CUDA device (driver missing or CUDA_VISIBLE_DEVICES empty)"
        raise BackendError(f"--device gpu was asked for but {why}; use --device cpu or --device auto")
    cupy = _import_cupy()
    dev = local_rank % n
    cupy.cuda.Device(dev).use()
    return Backend("gpu", cupy, device_id=dev)
