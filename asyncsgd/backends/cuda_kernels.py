"""Find the CUDA sources of asyncsgd, compile them once per process with ``cupy.RawModule`` and pick kernels by dtype.

The ``.cu`` files live in the top-level ``kernels/`` folder and are installed as the package ``asyncsgd.kernels``
(setup.py's ``package_dir``); after an install they are read through ``importlib.resources``, in a source checkout
from ``<repo>/kernels/``.  Each kernel exists as ``<name>_f32`` and ``<name>_f64`` (``extern "C"``, so no name
mangling and no ``name_expressions``).  This module imports without CuPy: only ``module()``/``kernel()`` need it.
"""
from __future__ import annotations

import functools
import importlib.resources
from pathlib import Path

import numpy

from asyncsgd.backends import device as _device

__all__ = ["KERNELS", "NVRTC_OPTIONS", "source_path", "read_source", "module", "kernel", "launch_blocks",
           "dtype_suffix"]

# Every source file and the kernel names it defines (without the dtype suffix).  The compile test checks that each
# file defines exactly these entry points for both dtypes.
KERNELS = {
    "conv": ("im2col", "col2im"),
    "pool": ("maxpool_forward", "maxpool_backward", "avgpool_forward", "avgpool_backward"),
    "sparse": ("count_at_least", "band_counts", "compact", "scatter_add"),
    "update": ("fused_update",),
}

# No contraction of a*b + c into one FMA: the kernels then round every operation as numpy does and match the numpy
# reference bit for bit (IEEE division and square root are NVRTC's defaults).
NVRTC_OPTIONS = ("--fmad=false",)

_SUFFIX = {numpy.dtype(numpy.float32): "f32", numpy.dtype(numpy.float64): "f64"}

THREADS = 256          # threads per block of the grid-stride kernels
_MAX_BLOCKS = 65536    # enough to fill any current GPU; grid-stride loops cover the rest


def _checkout_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "kernels"


def source_path(name: str):
    """Return the location (a ``Path`` or an importlib Traversable) of ``kernels/<name>.cu``.

    Looks in the installed package ``asyncsgd.kernels`` first, then in the source checkout; raises FileNotFoundError
    naming both places when neither has it.
    """
    if name not in KERNELS:
        raise ValueError(f"unknown kernel source {name!r}; expected one of {', '.join(KERNELS)}")
    filename = f"{name}.cu"
    try:
        installed = importlib.resources.files("asyncsgd.kernels") / filename
        if installed.is_file():
            return installed
    except ModuleNotFoundError:
        pass                                    # a source checkout: asyncsgd.kernels is not a package here
    local = _checkout_dir() / filename
    if local.is_file():
        return local
    raise FileNotFoundError(f"CUDA source {filename} is neither in the installed package asyncsgd.kernels nor in "
                            f"{_checkout_dir()}; reinstall asyncsgd (pip install .) so the .cu files are included")


def read_source(name: str) -> str:
    """Return the text of ``kernels/<name>.cu``."""
    return source_path(name).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=None)
def module(name: str):
    """Return the compiled ``cupy.RawModule`` of ``kernels/<name>.cu`` (compiled on first use, cached by CuPy)."""
    cupy = _device.import_cupy()
    if cupy is None:
        raise RuntimeError("asyncsgd.backends needs CuPy (pip install 'asyncsgd[gpu]'); use --device cpu without it")
    return cupy.RawModule(code=read_source(name), options=NVRTC_OPTIONS)


def dtype_suffix(dtype) -> str:
    """Return 'f32' or 'f64' for ``dtype``; TypeError for any other dtype."""
    dtype = numpy.dtype(dtype)
    try:
        return _SUFFIX[dtype]
    except KeyError:
        raise TypeError(f"GPU kernels take float32 or float64 arrays, got {dtype}") from None


def kernel(source: str, name: str, dtype):
    """Return the ``cupy.RawKernel`` ``<name>_<f32|f64>`` of ``kernels/<source>.cu`` for ``dtype``."""
    if name not in KERNELS.get(source, ()):
        raise ValueError(f"kernels/{source}.cu has no kernel {name!r}; it has {', '.join(KERNELS.get(source, ()))}")
    return module(source).get_function(f"{name}_{dtype_suffix(dtype)}")


def launch_blocks(total: int, threads: int = THREADS) -> int:
    """Return the grid size of a grid-stride kernel over ``total`` elements (at least 1)."""
    return max(1, min(_MAX_BLOCKS, -(-int(total) // threads)))
