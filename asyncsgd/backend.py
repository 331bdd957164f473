"""Choose the compute object of a rank once, and resolve optional imports in one place.

``select_ops(device, local_rank)`` returns the rank's ``ops``: ``asyncsgd.model.NumpyOps`` on a CPU rank,
``asyncsgd.gpu.CupyOps`` bound to one CUDA device on a GPU rank.  That one object owns the array module, host/device
moves, pinned staging, top-k selection, the optimizer step and the network primitives (asyncsgd/model/ops.py).

``cupy_importable()`` says whether CuPy can be imported; ``gpu_count()`` whether a GPU is usable.  These are
different questions: CuPy installs happily on machines without a driver.
"""
from __future__ import annotations

import functools
import os

import numpy

__all__ = ["BackendError", "cupy_importable", "gpu_count", "select_ops", "select_backend", "Backend", "DEVICES"]

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


def select_ops(device: str = "cpu", local_rank: int = 0):
    """Return the compute object for ``device`` ('cpu', 'gpu' or 'auto'): a NumpyOps or a CupyOps.

    A GPU rank binds device ``local_rank % gpu_count()``, so several ranks of a node may share one GPU.
    ``local_rank`` is the rank in the node-local communicator (``comm.Split_type(MPI.COMM_TYPE_SHARED)``).
    ``'gpu'`` without a usable GPU raises BackendError; ``'auto'`` falls back to the CPU (and so does every
    'auto' when ASYNCSGD_FORCE_CPU=1).
    """
    from .model.ops import NumpyOps

    if device not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if os.environ.get("ASYNCSGD_FORCE_CPU") == "1" and device == "auto":
        device = "cpu"
    if device == "cpu":
        return NumpyOps()
    n = gpu_count()
    if n == 0:
        if device == "auto":
            return NumpyOps()
        why = "CuPy is not installed (pip install 'asyncsgd[gpu]')" if not cupy_importable() else \
            "CuPy imports but finds no usable CUDA device (driver missing or CUDA_VISIBLE_DEVICES empty)"
        raise BackendError(f"--device gpu was asked for but {why}; use --device cpu or --device auto")
    from .gpu.cupy_ops import CupyOps
    return CupyOps(device_id=local_rank % n)


select_backend = select_ops     # the name the algorithms used before the compute object held everything


def Backend(name: str, xp=numpy, device_id: int | None = None):
    """Return the compute object of device ``name`` ('cpu' or 'gpu'): the older spelling of ``select_ops``."""
    if name not in ("cpu", "gpu"):
        raise ValueError(f"Backend name must be 'cpu' or 'gpu', got {name!r}")
    if name == "cpu":
        from .model.ops import NumpyOps
        return NumpyOps()
    from .gpu.cupy_ops import CupyOps
    return CupyOps(device_id=device_id)
