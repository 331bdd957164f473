"""GPU ranks' compute: CUDA kernels from ``kernels/*.cu`` behind thin CuPy wrappers.

- ``asyncsgd.gpu.kernels``: finds the .cu sources (installed package or source checkout), compiles them with
  ``cupy.RawModule`` and picks kernels by dtype;
- ``asyncsgd.gpu.cupy_ops.CupyOps``: the compute object of a GPU rank (a ``NumpyOps`` subclass): host/device moves,
  pinned staging, top-k, the fused optimizer step, and the network's conv/pool kernels;
- ``asyncsgd.gpu.sparse``: top-k selection with error feedback, scatter-add and the fused local update, which
  ``CupyOps.select_topk``/``scatter_add``/``sgd_update`` serve.

Every module here imports without CuPy; calling into the GPU without it raises RuntimeError.
"""
from asyncsgd.gpu.cupy_ops import CupyOps
from asyncsgd.gpu.sparse import fused_update, scatter_add, select_topk

__all__ = ["CupyOps", "select_topk", "scatter_add", "fused_update"]
