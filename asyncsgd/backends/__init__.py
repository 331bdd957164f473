"""A rank's compute object, chosen once: ``NumpyOps`` on a CPU rank, ``CupyOps`` (a subclass) on a GPU rank.

``select_ops(device, local_rank)`` returns the rank's ``ops``.  That one object owns the array module, host/device
moves, pinned staging, top-k selection, the optimizer step and the network primitives.  The numpy code is the
reference; the GPU overrides it with CUDA kernels (thinc's Ops pattern):

- ``numpy_ops``: ``NumpyOps``, the base (moves, optimizer step, layout, elementwise, dense and loss), built from
  the mixins ``conv`` (``ConvOps``: convolutions and their one GEMM helper), ``conv_pool`` (``ConvPoolOps``: the
  fused conv + max pool) and ``pooling`` (``PoolOps``); ``workspace``: the ``ws`` buffers and window sizes;
- ``cpu_kernels``: the optional compiled C kernels of the fused conv + pool (``_asyncsgd_cpu``);
- ``threads``: intra-op threads that split a batch into parts;
- ``sparse``: top-k selection with error feedback, scatter-add and the fused local update on the CPU;
- ``cupy_ops``: ``CupyOps``; ``cuda_kernels`` finds and compiles ``kernels/*.cu``; ``cuda_sparse`` is ``sparse``
  on the GPU;
- ``device``: which devices exist, CuPy imported in one place.

Every module here imports without CuPy; calling into the GPU without it raises RuntimeError.
"""
from __future__ import annotations

from asyncsgd.backends.device import DEVICES, BackendError, cupy_importable, gpu_count
from asyncsgd.runtime.env import force_cpu

__all__ = ["BackendError", "cupy_importable", "gpu_count", "select_ops", "DEVICES"]


def select_ops(device: str = "cpu", local_rank: int = 0):
    """Return the compute object for ``device`` ('cpu', 'gpu' or 'auto'): a NumpyOps or a CupyOps.

    A GPU rank binds device ``local_rank % gpu_count()``, so several ranks of a node may share one GPU.
    ``local_rank`` is the rank in the node-local communicator (``comm.Split_type(MPI.COMM_TYPE_SHARED)``).
    ``'gpu'`` without a usable GPU raises BackendError; ``'auto'`` falls back to the CPU (and so does every
    'auto' when ASYNCSGD_FORCE_CPU=1).
    """
    from asyncsgd.backends.numpy_ops import NumpyOps

    if device not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if force_cpu() and device == "auto":
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
    from asyncsgd.backends.cupy_ops import CupyOps
    return CupyOps(device_id=local_rank % n)
