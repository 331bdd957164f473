"""The compute object of a rank on numpy; ``asyncsgd.backends.cupy_ops.CupyOps`` overrides what its kernels speed up.

One ``ops`` object per rank owns everything that depends on where arrays live: the array module ``xp``, moves between
host and device (``to_host``/``to_device``/``staging_buffer``/``synchronize``), top-k selection with a residual
(``select_topk``), the optimizer step (``sgd_update``: momentum/Adagrad, one fused kernel on a GPU), and the network
layers' primitives.  Layers call only ``ops.<method>`` and ``ops.xp.<function>``, so the same layer code runs on
either backend.  ``asyncsgd.backends.select_ops(device)`` chooses the class for a rank.

Layout.  Image activations inside the network are *channel-major*: ``(C, N, H, W)`` ("CNHW"), C-contiguous.  With
this layout a convolution is one row-major GEMM ``W[F, C*kh*kw] @ col[C*kh*kw, N*Ho*Wo]`` whose result is already the
next layer's ``(F, N, Ho, Wo)`` input, im2col copies run along whole image rows, and no transposes are needed between
layers.  ``nchw_to_cnhw`` converts the network input (free when C == 1, as for speech and MNIST) and ``flatten`` turns
``(C, N, H, W)`` into ``(N, C*H*W)`` in the same feature order as flattening ``(N, C, H, W)`` (PyTorch's order).

Workspaces (``ws``) and window sizes: ``asyncsgd.backends.workspace``.  Intra-op threads (``NumpyOps(threads=T)``)
and the compiled kernels (``ops.cpu_kernels_on``) serve the fused conv + pool: ``asyncsgd.backends.conv_pool``.

The primitives live by concept in mixins of this class, every method written against ``self.xp``:
``asyncsgd.backends.conv`` (``ConvOps``: convolutions and their one GEMM helper), ``asyncsgd.backends.conv_pool``
(``ConvPoolOps``: the fused conv + max pool) and ``asyncsgd.backends.pooling`` (``PoolOps``); this module holds the
rest (moves, optimizer step, layout, elementwise, dense and loss) and the choice of fusion (``fuses_conv_pool``).

Weight gradients are written INTO the given ``dw``/``db`` arrays (views into the network's flat gradient vector),
overwriting them.  Inputs may be non-contiguous views (a method copies what it needs); outputs may be too.

For a subclass (the GPU ops).  The layer methods are: ``make_rng``, ``dropout_mask``, ``nchw_to_cnhw``, ``flatten``,
``unflatten``, ``conv2d_forward``/``conv2d_backward``, ``conv2d_maxpool_forward``/``conv2d_maxpool_backward`` (a
stride-1 conv followed by a 2x2/2 max-pool, and on NumpyOps optionally a ReLU, in one step), ``maxpool_forward``/``maxpool_backward``,
``avgpool_forward``/``avgpool_backward``, ``relu_*``, ``tanh_*``, ``sigmoid_*``, ``dense_forward``/``dense_backward``,
``softmax_cross_entropy``, ``sum_loss_and_correct``.  Every convolution goes through one GEMM helper,
``conv_columns`` + ``conv_gemm_forward`` / ``conv_gemm_backward`` (the bias folded in as a row of ones).  The base code is written against ``self.xp`` and also runs on CuPy arrays, so a subclass may
override any subset.  A network uses the fused conv+pool only while ``fuses_conv_pool`` is True: that is the case when
the subclass overrides none of the four unfused conv/pool methods, or when it overrides ``conv2d_maxpool_forward``
(and then also ``conv2d_maxpool_backward``, whose cache it defines).  Caches are opaque: only the matching backward
reads them.
"""
from __future__ import annotations

import contextlib

import numpy

from asyncsgd.backends import cpu_kernels
from asyncsgd.backends.conv import ConvOps
from asyncsgd.backends.conv_pool import ConvPoolOps
from asyncsgd.backends.pooling import PoolOps
from asyncsgd.backends.threads import PartRunner, blas_pinnable, intra_op_threads, single_thread_blas, split_batch
from asyncsgd.backends.workspace import cached_buffer, conv_output_size, pair

__all__ = ["NumpyOps", "cached_buffer", "conv_output_size", "pair"]


class NumpyOps(ConvOps, ConvPoolOps, PoolOps):
    """The compute object of a CPU rank, and the reference implementation of every primitive.

    Subclasses set ``xp`` to their array module and override methods they speed up; every method's contract is
    stated in its docstring and holds for float32 and float64.
    """

    xp = numpy
    name = "numpy"
    device = "cpu"          # "cpu" or "gpu": what --device asked for and got
    device_id = None        # the CUDA device of a GPU rank
    is_gpu = False
    threads = 1             # intra-op threads: batch parts run at once (see asyncsgd.backends.threads)
    _runner = None
    cpu_kernels_on = False  # the fused conv+pool runs its copies and masks in asyncsgd.backends.cpu_kernels

    def __init__(self, threads: int | None = None, cpu_kernels_on: bool | None = None):
        """``threads``: how many batch parts a convolution runs at once, each with a one-thread BLAS (default: the
        BLAS thread count of the environment, else 1; 1 when OpenBLAS's thread count cannot be set at run time).

        ``cpu_kernels_on``: whether the fused conv+pool runs its copies and masks in the compiled kernels of
        ``asyncsgd.backends.cpu_kernels`` (float32 only; bit-identical to the numpy code).  None: where they are built
        and ``ASYNCSGD_CPU_KERNELS`` is not 0; True: required (RuntimeError when they are not built); False: never.
        """
        if threads is None:
            threads = intra_op_threads()
        if not isinstance(threads, (int, numpy.integer)) or isinstance(threads, bool):
            raise TypeError(f"NumpyOps threads must be an int >= 1, got {threads!r}")
        if threads < 1:
            raise ValueError(f"NumpyOps threads must be >= 1, got {threads}; use 1 for no intra-op threads")
        self.threads = int(threads) if blas_pinnable() else 1
        self._runner = PartRunner(self.threads) if self.threads > 1 else None
        if cpu_kernels_on is not None and not isinstance(cpu_kernels_on, bool):
            raise TypeError(f"NumpyOps cpu_kernels_on must be None, True or False, got {cpu_kernels_on!r}")
        if cpu_kernels_on and not cpu_kernels.available():
            raise RuntimeError("NumpyOps(cpu_kernels_on=True): the compiled module _asyncsgd_cpu is not built for this "
                               "source; reinstall with a C compiler (pip install .) or run python setup.py "
                               "build_ext --inplace in a source checkout")
        use = cpu_kernels.enabled() if cpu_kernels_on is None else cpu_kernels_on
        self.cpu_kernels_on = use and self.xp is numpy

    def pass_section(self):
        """Return the context a network's forward or backward pass runs in.

        With intra-op threads OpenBLAS stays on one thread for the whole pass, the dense layers' GEMMs included:
        an OpenBLAS worker woken by one multi-threaded GEMM spins for milliseconds afterwards, and on a machine with
        as many cores as parts that spinning thread slows the parts running beside it (measured on 2 cores, speech_cnn
        batch 64: 1,000 samples/s with OpenBLAS pinned around the convolutions only, 1,500-1,900 with the whole
        pass pinned, against 1,000-1,180 on one thread).
        """
        if getattr(self, "_runner", None) is None:
            return contextlib.nullcontext()
        return single_thread_blas()

    def __repr__(self):
        dev = "" if self.device_id is None else f"device={self.device_id}"
        return f"{type(self).__name__}({dev})"

    # ---- memory: host/device moves and staging --------------------------------------------------------------------
    def to_host(self, a, out=None):
        """Return ``a`` as a numpy array, copied into ``out`` (a numpy array, pinned or not) when given.

        On the CPU ``a`` itself is returned when ``out`` is None (no copy).
        """
        if out is not None:
            numpy.copyto(out, a)
            return out
        return numpy.asarray(a)

    def to_device(self, a, out=None):
        """Return host array ``a`` in this backend's memory (copied into ``out`` when given; else no copy on CPU)."""
        if out is not None:
            numpy.copyto(out, a)
            return out
        return a

    def staging_buffer(self, n: int, dtype=numpy.float32):
        """Return an uninitialised host array (n,) for copies to and from the device (pinned on a GPU rank)."""
        return numpy.empty(int(n), dtype)

    def synchronize(self):
        """Wait for queued device work (a no-op on CPU)."""

    # ---- sparse pushes and the optimizer step ---------------------------------------------------------------------
    def select_topk(self, accrued, fraction: float, residual):
        """Choose the largest-magnitude ``fraction`` of ``accrued + residual``; keep the rest in ``residual``.

        Returns ``(idx int64 ascending, values)`` in this backend's memory; the contract of
        ``asyncsgd.backends.sparse.select_topk``.
        """
        from asyncsgd.backends import sparse
        return sparse.select_topk(accrued, fraction, residual)

    def scatter_add(self, dense, idx, values):
        """``dense[idx] += values`` in place (repeated indices summed): ``asyncsgd.backends.sparse.scatter_add``."""
        from asyncsgd.backends import sparse
        sparse.scatter_add(dense, idx, values)
        return dense

    def sgd_update(self, params, grad, *, lr: float, momentum: float = 0.0, velocity=None, weight: float = 1.0,
                   sum_sq=None, eps: float = 1e-8, accrued=None):
        """One optimizer step in place: ``v = momentum*v + g; params -= (weight*lr) * v`` (with Adagrad scaling of g
        when ``sum_sq`` is given, and ``accrued += v`` when given).  The contract of ``asyncsgd.backends.sparse.fused_update``;
        one fused kernel on a GPU.  All arrays (n,) of one float dtype, C-contiguous.
        """
        from asyncsgd.backends import sparse
        sparse.fused_update(params, grad, lr=lr, momentum=momentum, velocity=velocity, weight=weight,
                            sum_sq=sum_sq, eps=eps, accrued=accrued)

    # ---- random numbers -------------------------------------------------------------------------------------------
    def make_rng(self, seed: int):
        """Return this backend's random generator seeded with ``seed`` (used for dropout masks)."""
        return numpy.random.default_rng(seed)

    def dropout_mask(self, shape, rate: float, rng, dtype):
        """Return an array of ``shape``: ``1/(1-rate)`` where a uniform draw is >= rate, else 0 (inverted dropout).

        ``rng`` is what ``make_rng`` returned, or a ``numpy.random.Generator`` (its draws are then made on the host).
        """
        u = rng.random(shape, dtype=numpy.float32)
        mask = (u >= rate).astype(dtype)
        mask *= 1.0 / (1.0 - rate)
        return self.xp.asarray(mask)

    # ---- layout ---------------------------------------------------------------------------------------------------
    def nchw_to_cnhw(self, x):
        """Return ``x`` (N, C, H, W) as a C-contiguous (C, N, H, W) array (a view when C == 1)."""
        return self.xp.ascontiguousarray(x.transpose(1, 0, 2, 3))

    def flatten(self, x):
        """Return (C, N, H, W) ``x`` as (N, C*H*W), features ordered (c, h, w)."""
        c, n, h, w = x.shape
        return self.xp.ascontiguousarray(x.transpose(1, 0, 2, 3)).reshape(n, c * h * w)

    def unflatten(self, d, shape):
        """Return (N, C*H*W) ``d`` as a C-contiguous (C, N, H, W) array of ``shape`` (C, N, H, W): undo flatten."""
        c, n, h, w = shape
        return self.xp.ascontiguousarray(d.reshape(n, c, h, w).transpose(1, 0, 2, 3))

    # ---- convolution fused with 2x2 max pooling --------------------------------------------------------------------
    @property
    def fuses_conv_pool(self) -> bool:
        """True when ``conv2d_maxpool_*`` may replace a stride-1 Conv2D followed by a 2x2/2 MaxPool2D.

        A subclass that overrides the unfused conv or pool primitives but not the fused pair gets False, so its own
        kernels are used; overriding ``conv2d_maxpool_forward`` turns fusion back on.
        """
        cls = type(self)
        own = cls.conv2d_maxpool_forward is not NumpyOps.conv2d_maxpool_forward
        plain = (cls.conv2d_forward is NumpyOps.conv2d_forward and cls.maxpool_forward is NumpyOps.maxpool_forward
                 and cls.conv2d_backward is NumpyOps.conv2d_backward
                 and cls.maxpool_backward is NumpyOps.maxpool_backward)
        return own or plain

    @property
    def fuses_conv_pool_relu(self) -> bool:
        """True when ``conv2d_maxpool_*`` also take ``relu=True`` (NumpyOps' own pair, not a subclass's override)."""
        cls = type(self)
        return (cls.conv2d_maxpool_forward is NumpyOps.conv2d_maxpool_forward
                and cls.conv2d_maxpool_backward is NumpyOps.conv2d_maxpool_backward)

    # ---- intra-op threads ------------------------------------------------------------------------------------------
    def _run_parts(self, fn, count):
        runner = getattr(self, "_runner", None)
        if runner is None or count <= 1:
            return [fn(i) for i in range(count)]
        return runner.run(fn, count)

    # ---- elementwise ----------------------------------------------------------------------------------------------
    def relu_forward(self, x, ws=None):
        """Return max(x, 0) (same shape as x); the result is the cache ``relu_backward`` needs."""
        ws = {} if ws is None else ws
        y = cached_buffer(ws, "y", x.shape, x.dtype, self.xp)
        self.xp.maximum(x, 0, out=y)
        return y

    def relu_backward(self, dy, y, ws=None):
        """Return dy * (y > 0) for y the output of ``relu_forward``."""
        ws = {} if ws is None else ws
        dx = cached_buffer(ws, "dx", dy.shape, dy.dtype, self.xp)
        self.xp.multiply(dy, y > 0, out=dx)
        return dx

    def tanh_forward(self, x, ws=None):
        """Return tanh(x); the result is the cache ``tanh_backward`` needs."""
        ws = {} if ws is None else ws
        y = cached_buffer(ws, "y", x.shape, x.dtype, self.xp)
        self.xp.tanh(x, out=y)
        return y

    def tanh_backward(self, dy, y, ws=None):
        """Return dy * (1 - y*y) for y the output of ``tanh_forward``."""
        ws = {} if ws is None else ws
        dx = cached_buffer(ws, "dx", dy.shape, dy.dtype, self.xp)
        self.xp.multiply(y, y, out=dx)
        self.xp.subtract(1, dx, out=dx)
        dx *= dy
        return dx

    def sigmoid_forward(self, x, ws=None):
        """Return 1/(1 + exp(-x)), computed as (1 + tanh(x/2))/2 (no overflow for large |x|); the backward's cache."""
        ws = {} if ws is None else ws
        y = cached_buffer(ws, "y", x.shape, x.dtype, self.xp)
        self.xp.multiply(x, 0.5, out=y)
        self.xp.tanh(y, out=y)
        y += 1
        y *= 0.5
        return y

    def sigmoid_backward(self, dy, y, ws=None):
        """Return dy * y * (1 - y) for y the output of ``sigmoid_forward``."""
        ws = {} if ws is None else ws
        dx = cached_buffer(ws, "dx", dy.shape, dy.dtype, self.xp)
        self.xp.subtract(1, y, out=dx)
        dx *= y
        dx *= dy
        return dx

    # ---- dense and loss -------------------------------------------------------------------------------------------
    def dense_forward(self, x, w, b):
        """Return x @ w + b for x (N, D), w (D, K), b (K,): (N, K)."""
        parts = self._gemm_parts(w.shape[1])
        if len(parts) == 1:
            y = x @ w
            y += b
            return y
        y = self.xp.empty((x.shape[0], w.shape[1]), numpy.result_type(x, w))

        def part(i):  # a slice of the output units each: no reduction between the threads
            k0, k1 = parts[i]
            self.xp.matmul(x, w[:, k0:k1], out=y[:, k0:k1])
            y[:, k0:k1] += b[k0:k1]

        self._run_parts(part, len(parts))
        return y

    def dense_backward(self, dy, x, w, dw, db, need_dx: bool = True):
        """Write dL/dw = x.T @ dy into ``dw`` (D, K) and dL/db into ``db`` (K,); return dx = dy @ w.T (N, D) or None."""
        self.xp.sum(dy, axis=0, out=db)
        parts = self._gemm_parts(w.shape[1])
        if len(parts) == 1:
            self.xp.matmul(x.T, dy, out=dw)
            return dy @ w.T if need_dx else None
        rows = self._gemm_parts(w.shape[0])
        dx = self.xp.empty(x.shape, numpy.result_type(dy, w)) if need_dx else None

        def part(i):  # dw by output units, dx by input features: each thread owns its slices
            k0, k1 = parts[i]
            self.xp.matmul(x.T, dy[:, k0:k1], out=dw[:, k0:k1])
            if dx is not None:
                d0, d1 = rows[i]
                self.xp.matmul(dy, w[d0:d1].T, out=dx[:, d0:d1])

        self._run_parts(part, len(parts))
        return dx

    def _gemm_parts(self, n):
        """Return the [(start, stop), ...] slices of a dense layer's GEMM dimension of size ``n``, one per thread
        (one slice when the ops run one thread, or when ``n`` is too small to give every thread 16)."""
        threads = getattr(self, "threads", 1)
        if threads <= 1 or getattr(self, "_runner", None) is None or n < 16 * threads:
            return [(0, n)]
        return split_batch(n, threads)

    def softmax_cross_entropy(self, logits, y, need_grad: bool = True):
        """Return ``(mean_loss, dlogits)`` of softmax cross-entropy for logits (N, K) and int labels y (N,).

        mean_loss is a 0-d array in the backend's memory (float(...) it on the host); dlogits (N, K) is the gradient
        of the MEAN loss, or None when ``need_grad`` is False.
        """
        xp = self.xp
        n = logits.shape[0]
        shifted = logits - logits.max(axis=1, keepdims=True)
        e = xp.exp(shifted)
        s = e.sum(axis=1, keepdims=True)
        rows = xp.arange(n)
        loss = (xp.log(s[:, 0]) - shifted[rows, y]).mean()
        if not need_grad:
            return loss, None
        e /= s
        e[rows, y] -= 1
        e /= n
        return loss, e

    def sum_loss_and_correct(self, logits, y):
        """Return (sum of cross-entropy losses, number of argmax hits) as 0-d arrays, for evaluation."""
        xp = self.xp
        shifted = logits - logits.max(axis=1, keepdims=True)
        rows = xp.arange(logits.shape[0])
        losses = xp.log(xp.exp(shifted).sum(axis=1)) - shifted[rows, y]
        return losses.sum(), (logits.argmax(axis=1) == y).sum()
