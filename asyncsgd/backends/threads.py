"""Intra-op threads of a CPU rank: a batch split into parts that run at once, each with a one-thread BLAS.

The convolutions of a small CNN are many modest GEMMs plus copies, pooling and masks around them.  OpenBLAS gains
little from a second thread on GEMMs this small, and the work around them runs on one thread whatever the BLAS does.
Splitting the batch into one part per thread and running the parts in a thread pool (numpy and BLAS release the GIL)
parallelises all of it; each part's GEMMs then must run on one BLAS thread, or the parts' BLAS threads would
oversubscribe the cores.

``intra_op_threads()`` is the thread count a ``NumpyOps`` uses by default: the BLAS thread count of the environment
(``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS``, which ``asyncsgd.runtime.env`` sets to each rank's
share of the node when several ranks share it), else 1.  ``single_thread_blas()`` pins OpenBLAS to one thread while
the parts run (through OpenBLAS's own ``openblas_set_num_threads``, found in the loaded library); where that is not
possible (another BLAS, or no /proc/self/maps), ``blas_pinnable()`` is False and the parts run one after another.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait

__all__ = ["intra_op_threads", "blas_pinnable", "single_thread_blas", "split_batch", "PartRunner"]

_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
_SETTERS = ("openblas_set_num_threads", "scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
            "openblas_set_num_threads64_")
_GETTERS = ("openblas_get_num_threads", "scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
            "openblas_get_num_threads64_")
_blas_lock = threading.Lock()
_blas_pins = 0          # nested single_thread_blas() sections now open (several ops objects may run at once)
_blas_saved = 1


def intra_op_threads() -> int:
    """Return the BLAS thread count the environment asks for (first valid of OPENBLAS/OMP/MKL_NUM_THREADS), else 1."""
    for name in _THREAD_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) >= 1:
            return int(value)
    return 1


@functools.lru_cache(maxsize=None)
def _openblas():
    """Return (set, get) ctypes functions of the OpenBLAS that numpy loaded, or None."""
    import numpy  # noqa: F401  (loads the BLAS whose functions we look for)
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower() and ".so" in line})
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        setter = next((getattr(lib, s) for s in _SETTERS if hasattr(lib, s)), None)
        getter = next((getattr(lib, g) for g in _GETTERS if hasattr(lib, g)), None)
        if setter is not None and getter is not None:
            setter.argtypes, setter.restype = [ctypes.c_int], None
            getter.argtypes, getter.restype = [], ctypes.c_int
            return setter, getter
    return None


def blas_pinnable() -> bool:
    """Return True when numpy's BLAS is an OpenBLAS whose thread count can be set at run time."""
    return _openblas() is not None


@contextlib.contextmanager
def single_thread_blas():
    """Run the body with OpenBLAS on one thread (restored after; nesting and concurrent users are counted)."""
    global _blas_pins, _blas_saved
    funcs = _openblas()
    if funcs is None:
        yield
        return
    setter, getter = funcs
    with _blas_lock:
        if _blas_pins == 0:
            _blas_saved = getter()
            if _blas_saved != 1:
                setter(1)
        _blas_pins += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_pins -= 1
            if _blas_pins == 0 and _blas_saved != 1:
                setter(_blas_saved)


def split_batch(n: int, parts: int):
    """Return ``[(start, stop), ...]``: ``n`` rows in ``min(parts, n)`` contiguous balanced parts (first ones larger)."""
    parts = max(1, min(int(parts), int(n)))
    base, extra = divmod(int(n), parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


class PartRunner:
    """Runs ``fn(i)`` for parts 0..count-1 at once: part 0 on the calling thread, the others in a pool of threads."""

    def __init__(self, threads: int):
        self.threads = int(threads)
        self._pool = None

    def run(self, fn, count: int):
        """Return ``[fn(0), ..., fn(count-1)]``; every part has finished when this returns or raises."""
        if count <= 1:
            return [fn(0)]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.threads - 1, thread_name_prefix="asyncsgd-op")
        with single_thread_blas():
            futures = [self._pool.submit(fn, i) for i in range(1, count)]
            try:
                first = fn(0)
            finally:
                wait(futures)           # the parts write into shared buffers: none may outlive this call
            return [first] + [f.result() for f in futures]

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
