"""The compute object of a rank on numpy; ``asyncsgd.backends.cupy_ops.CupyOps`` overrides what its kernels speed up.

One ``ops`` object per rank owns everything that depends on where arrays live: the array module ``xp``, moves between
host and device (``to_host``/``to_device``/``staging_buffer``/``synchronize``), top-k selection with a residual
(``select_topk``), the optimizer step (``sgd_update``: momentum/Adagrad, one fused kernel on a GPU), and the network
layers' primitives.  Layers call only ``ops.<method>`` and ``ops.xp.<function>``, so the same layer code runs on
either backend.  ``asyncsgd.backends.select_ops(device)`` chooses the class for a rank.

Sizes of windows, strides and paddings are an int (square) or an ``(h, w)`` pair; ``pair()`` normalises them.

Layout.  Image activations inside the network are *channel-major*: ``(C, N, H, W)`` ("CNHW"), C-contiguous.  With
this layout a convolution is one row-major GEMM ``W[F, C*kh*kw] @ col[C*kh*kw, N*Ho*Wo]`` whose result is already the
next layer's ``(F, N, Ho, Wo)`` input, im2col copies run along whole image rows, and no transposes are needed between
layers.  ``nchw_to_cnhw`` converts the network input (free when C == 1, as for speech and MNIST) and ``flatten`` turns
``(C, N, H, W)`` into ``(N, C*H*W)`` in the same feature order as flattening ``(N, C, H, W)`` (PyTorch's order).

Workspaces.  Methods taking ``ws`` receive a dict that the calling layer keeps between calls; a method may keep
reusable buffers in it (keyed by what it needs) so a training loop allocates nothing after its first step.  Arrays a
method returns may live in ``ws``: they are valid until the next call with the same ``ws``, which is how the layers
use them (forward of step t+1 starts after backward of step t).

Threads.  ``NumpyOps(threads=T)`` (default: the BLAS thread count of the environment, else 1; see
``asyncsgd.backends.threads``) runs the fused conv+pool of a batch as T batch parts at once, each part's GEMMs on one
BLAS thread; the results equal one thread's up to the order in which the parts' weight gradients are summed.

Compiled kernels.  Where the optional extension ``_asyncsgd_cpu`` is built (``pip install`` builds it), the fused
conv+pool runs its copies and masks in C (``asyncsgd.backends.cpu_kernels``) on float32, bit-identical to the numpy
code here, which runs otherwise (float64, no build, ``ASYNCSGD_CPU_KERNELS=0``); ``ops.cpu_kernels_on`` says which.

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

from asyncsgd.runtime.faults import fault_point
from asyncsgd.backends import cpu_kernels
from asyncsgd.backends.threads import PartRunner, blas_pinnable, intra_op_threads, single_thread_blas, split_batch

__all__ = ["NumpyOps", "cached_buffer", "conv_output_size", "pair"]


def cached_buffer(ws, key, shape, dtype, xp, zero=False):
    """Return a cached array of ``shape``/``dtype`` from ``ws`` (allocated on first use or when the shape changes).

    ``zero`` zeroes a freshly allocated buffer only; callers rely on this to keep zero borders between calls.
    """
    buf = ws.get(key)
    if buf is None or buf.shape != tuple(shape) or buf.dtype != dtype:
        buf = xp.zeros(shape, dtype) if zero else xp.empty(shape, dtype)
        ws[key] = buf
    return buf


def pair(value, name: str = "size") -> tuple[int, int]:
    """Return ``value`` (an int or a 2-sequence of ints) as ``(h, w)``; TypeError/ValueError naming ``name``."""
    if isinstance(value, (int, numpy.integer)) and not isinstance(value, bool):
        return int(value), int(value)
    try:
        h, w = value
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an int or an (h, w) pair of ints, got {value!r}") from None
    for v in (h, w):
        if not isinstance(v, (int, numpy.integer)) or isinstance(v, bool):
            raise TypeError(f"{name} must be an int or an (h, w) pair of ints, got {value!r}")
    return int(h), int(w)


def conv_output_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """Return the output length of a convolution or pooling window along one axis (floor division)."""
    return (size + 2 * pad - kernel) // stride + 1


class NumpyOps:
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

    # ---- convolution ----------------------------------------------------------------------------------------------
    def conv2d_forward(self, x, w, b, stride, pad, ws=None):
        """Return ``(y, cache)`` of a 2-D cross-correlation (PyTorch's Conv2d) with zero padding.

        x: (C, N, H, W); w: (F, C, kh, kw); b: (F,); ``stride`` and ``pad`` an int or an (h, w) pair;
        y: (F, N, Ho, Wo) with ``Ho = (H + 2*pad_h - kh)//stride_h + 1`` (likewise Wo) and
        ``y[f, n, i, j] = b[f] + sum_{c,p,q} w[f, c, p, q] * xpad[c, n, i*stride_h + p, j*stride_w + q]``.
        ``cache`` is opaque; pass it unchanged to ``conv2d_backward``.

        Implementation: x is copied into a zero-bordered buffer, the kh*kw shifted windows are copied with one
        strided copy into the columns of ``conv_columns``, and ``conv_gemm_forward`` gives y.
        """
        xp = self.xp
        ws = {} if ws is None else ws
        (sh, sw), (ph, pw) = pair(stride, "stride"), pair(pad, "pad")
        c, n, h, wd = x.shape
        ho, wo = self._conv_shape(x.shape, w.shape, (sh, sw), (ph, pw))
        f, _, kh, kw = w.shape
        if ph or pw:
            xpad = cached_buffer(ws, "xpad", (c, n, h + 2 * ph, wd + 2 * pw), x.dtype, xp, zero=True)
            xpad[:, :, ph:ph + h, pw:pw + wd] = x   # the border stays zero from allocation
        else:
            xpad = x
        k = c * kh * kw
        col = self.conv_columns(ws, k, n * ho * wo, x.dtype)
        self.im2col(xpad, kh, kw, (sh, sw), ho, wo, out=col[:k].reshape(c, kh, kw, n, ho, wo))
        y = self.conv_gemm_forward(w, b, col, ws)
        cache = (x.shape, (sh, sw), (ph, pw), ho, wo, col, xpad.shape)
        return y.reshape(f, n, ho, wo), cache

    @staticmethod
    def _conv_shape(xshape, wshape, stride, pad):
        """Return (Ho, Wo) of a convolution; ValueError when channels differ or the kernel does not fit."""
        c, _, h, wd = xshape
        _, c2, kh, kw = wshape
        if c2 != c:
            raise ValueError(f"conv2d: input has {c} channels but the weights expect {c2}")
        ho, wo = conv_output_size(h, kh, stride[0], pad[0]), conv_output_size(wd, kw, stride[1], pad[1])
        if ho < 1 or wo < 1:
            raise ValueError(f"conv2d: input {h}x{wd} is smaller than the {kh}x{kw} kernel (pad {pad[0]}x{pad[1]})")
        return ho, wo

    def im2col(self, xpad, kh: int, kw: int, stride, ho: int, wo: int, out):
        """Copy windows of padded ``xpad`` (C, N, Hp, Wp) into ``out`` (C, kh, kw, N, Ho, Wo):

        ``out[c, p, q, n, i, j] = xpad[c, n, i*stride_h + p, j*stride_w + q]``; ``stride`` an int or (h, w) pair.
        """
        (sh, sw) = pair(stride, "stride")
        s_c, s_n, s_h, s_w = xpad.strides
        view = self.xp.lib.stride_tricks.as_strided(
            xpad, shape=out.shape, strides=(s_c, s_h, s_w, s_n, s_h * sh, s_w * sw))
        self.xp.copyto(out, view)
        return out

    def col2im_add(self, dcol, stride, out):
        """Add ``dcol`` (C, kh, kw, N, Ho, Wo) into ``out`` (C, N, Hp, Wp): the adjoint of ``im2col``.

        ``out[c, n, i*stride_h + p, j*stride_w + q] += dcol[c, p, q, n, i, j]``; one strided add per kernel offset.
        """
        (sh, sw) = pair(stride, "stride")
        _, kh, kw, _, ho, wo = dcol.shape
        for p in range(kh):
            for q in range(kw):
                dst = out[:, :, p:p + sh * (ho - 1) + 1:sh, q:q + sw * (wo - 1) + 1:sw]
                dst += dcol[:, p, q]
        return out

    def conv2d_backward(self, dy, cache, w, dw, db, need_dx: bool = True, ws=None):
        """Write the weight gradients of ``conv2d_forward`` into ``dw``/``db`` and return dx (or None).

        dy: (F, N, Ho, Wo) gradient of the loss w.r.t. y; w: (F, C, kh, kw) the forward weights;
        dw: (F, C, kh, kw) and db: (F,) arrays that are OVERWRITTEN with dL/dw and dL/db;
        returns dx: (C, N, H, W) (possibly a non-contiguous view into ``ws``), or None when ``need_dx`` is False
        (the network's first layer), which skips the input-gradient GEMM.
        """
        xp = self.xp
        ws = {} if ws is None else ws
        xshape, stride, (ph, pw), ho, wo, col, pshape = cache
        c, n, h, wd = xshape
        f, _, kh, kw = w.shape
        dcol = self.conv_gemm_backward(dy.reshape(f, n * ho * wo), col, w, dw, db, need_dx, ws)
        if dcol is None:
            return None
        dxpad = cached_buffer(ws, "dxpad", pshape, dy.dtype, xp)
        dxpad.fill(0)
        self.col2im_add(dcol.reshape(c, kh, kw, n, ho, wo), stride, dxpad)
        if ph or pw:
            return dxpad[:, :, ph:ph + h, pw:pw + wd]
        return dxpad

    # ---- the convolution GEMM, shared by every convolution of every backend ---------------------------------------
    def conv_columns(self, ws, k: int, p: int, dtype):
        """Return the cached column matrix (K + 1, P) of a convolution whose last row is ones (the bias row).

        Rows 0..K-1 are the caller's to fill (im2col); the ones row is written once per buffer.
        """
        col = ws.get("col")
        if col is None or col.shape != (k + 1, p) or col.dtype != dtype:
            col = self.xp.empty((k + 1, p), dtype)
            col[k] = 1
            ws["col"] = col
        return col

    def conv_gemm_forward(self, w, b, col, ws):
        """Return ``[w | b] @ col`` (F, P) for w (F, C, kh, kw), b (F,) and ``col`` from ``conv_columns``.

        The ones row of ``col`` folds the bias into the GEMM, saving a pass over y; y lives in ``ws``.
        """
        xp = self.xp
        f, k = w.shape[0], col.shape[0] - 1
        wb = cached_buffer(ws, "wb", (f, k + 1), w.dtype, xp)
        wb[:, :k] = w.reshape(f, k)
        wb[:, k] = b
        y = cached_buffer(ws, "y", (f, col.shape[1]), col.dtype, xp)
        xp.matmul(wb, col, out=y)
        return y

    def conv_gemm_backward(self, dy2, col, w, dw, db, need_dx: bool, ws):
        """The two GEMMs of a convolution's backward pass.

        dy2: (F, P) output gradient; col: (K + 1, P) the forward's columns with their ones row, K = C*kh*kw.
        Overwrites dw (F, C, kh, kw) and db (F,) from one GEMM ``dy2 @ col.T`` (the ones row yields db);
        returns dcol = w^T dy2, (K, P), for col2im, or None when ``need_dx`` is False.
        """
        xp = self.xp
        f, k, p = w.shape[0], col.shape[0] - 1, dy2.shape[1]
        # (dy2 @ col.T).T computed as col @ dy2.T: the same products and sums, and 17-30% faster with OpenBLAS for
        # these long, thin GEMMs (measured on the speech_cnn convolutions, one thread).
        dwbt = cached_buffer(ws, "dwbt", (k + 1, f), dy2.dtype, xp)
        xp.matmul(col, dy2.T, out=dwbt)
        dw[...] = dwbt[:k].T.reshape(dw.shape)
        db[...] = dwbt[k]
        if not need_dx:
            return None
        dcol = cached_buffer(ws, "dcol", (k, p), dy2.dtype, xp)
        xp.matmul(w.reshape(f, k).T, dy2, out=dcol)
        return dcol

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

    def conv2d_maxpool_forward(self, x, w, b, pad, ws=None, relu: bool = False):
        """Return ``(y, cache)`` of a stride-1 ``conv2d_forward`` followed by ``maxpool_forward`` with size 2, stride 2.

        x: (C, N, H, W); w: (F, C, kh, kw); b: (F,); ``pad`` an int or (h, w) pair; y: (F, N, Ho//2, Wo//2) with
        ``Ho = H + 2*pad_h - kh + 1`` (likewise Wo), possibly a non-contiguous view.  Values and the routing of
        gradients to each window's first maximum equal the unfused pair; conv outputs the pooling ignores (an odd last
        row or column) are not computed.  ``relu=True`` also applies a following ReLU (``max(y, 0)``, and its mask
        in the backward pass), as ``relu_forward``/``relu_backward`` would.

        Why it is faster (memory traffic, not FLOPs, bounds numpy here):
        - the GEMM's columns are ordered (a, b, n, i, j) for conv output row 2i+a, column 2j+b, so the four members of
          every pooling window lie in four contiguous slabs and pooling is a few vectorised maxima;
        - the padded input is split once into its four row/column parity planes ("polyphase"), so window (p, q) of
          output parity (a, b) reads plane ((a+p)%2, (b+q)%2) at offset ((a+p)//2, (b+q)//2) with unit stride;
        - each output row j runs over the plane's full width Wq instead of Wo//2, so one copy per image is a single
          run of (Ho//2)*Wq values; the few extra columns are junk that is never returned and gets zero gradient;
        - with ``threads`` > 1 the batch is split into one part per thread, each part doing all of the above (GEMM
          included, on one BLAS thread) at once; the backward sums the parts' weight gradients in part order.
        """
        xp = self.xp
        ws = {} if ws is None else ws
        pad = pair(pad, "pad")
        c, n, h, wd = x.shape
        f, c2, kh, kw = w.shape
        if c2 != c:
            raise ValueError(f"conv2d: input has {c} channels but the weights expect {c2}")
        hh, wh = (h + 2 * pad[0] - kh + 1) // 2, (wd + 2 * pad[1] - kw + 1) // 2
        if hh < 1 or wh < 1:
            raise ValueError(f"conv2d+maxpool: input {h}x{wd} gives no 2x2 pooling window after the {kh}x{kw} conv")
        wq = (wd + 2 * pad[1] + 1) // 2
        run = hh * wq
        out = cached_buffer(ws, "pooled", (f, n * run), x.dtype, xp)
        parts = self._batch_parts(n)
        subs = self._part_workspaces(ws, len(parts))

        def part(i):
            n0, n1 = parts[i]
            return self._conv_pool_part(x[:, n0:n1], w, b, pad, subs[i], out[:, n0 * run:n1 * run], relu)

        caches = self._run_parts(part, len(parts))
        cache = (x.shape, pad, hh, wh, wq, relu, parts, caches, out)
        return out.reshape(f, n, hh, wq)[:, :, :, :wh], cache

    def _runs_cpu_kernels(self, dtype) -> bool:
        """True when the fused conv+pool of ``dtype`` arrays runs in asyncsgd.backends.cpu_kernels (float32 only)."""
        return self.cpu_kernels_on and dtype == numpy.float32

    def _batch_parts(self, n):
        """Return the [(start, stop), ...] parts of a batch of ``n`` that run at once (one part on one thread)."""
        threads = getattr(self, "threads", 1)
        return [(0, n)] if threads <= 1 else split_batch(n, threads)

    @staticmethod
    def _part_workspaces(ws, count):
        subs = ws.get("parts")
        if subs is None or len(subs) != count:
            subs = ws["parts"] = [{} for _ in range(count)]
        return subs

    def _run_parts(self, fn, count):
        runner = getattr(self, "_runner", None)
        if runner is None or count <= 1:
            return [fn(i) for i in range(count)]
        return runner.run(fn, count)

    def _conv_pool_part(self, x, w, b, pad, ws, out, relu):
        """The fused forward of one batch part: writes the pooled values into ``out`` (F, n*run); returns its cache."""
        fault_point("conv")  # test tool: an exception inside a batch part (on an intra-op thread, where there are some)
        xp = self.xp
        ph, pw = pad
        c, n, h, wd = x.shape
        f, _, kh, kw = w.shape
        hh = (h + 2 * ph - kh + 1) // 2
        hq, wq = (h + 2 * ph + 1) // 2 + 1, (wd + 2 * pw + 1) // 2   # +1 row: slack for the last run's junk tail
        k, run = c * kh * kw, hh * wq
        m = n * run
        if self._runs_cpu_kernels(x.dtype):                 # the same columns and maxima, made in C
            col = self.conv_columns(ws, k, 4 * m, x.dtype)
            cpu_kernels.im2col(x, col, kh, kw, pad, hq, wq, run)
            y = self.conv_gemm_forward(w, b, col, ws).reshape(f, 4, m)
            arg = cached_buffer(ws, "arg", (f, m), numpy.uint8, xp)
            cpu_kernels.max4(y, out, arg, relu)
            return (x.shape, col, arg)
        planes = cached_buffer(ws, "planes", (2, 2, c, n, hq, wq), x.dtype, xp, zero=True)
        for r in (0, 1):
            for s in (0, 1):
                src, dst = self._parity_slices(x.shape, pad, r, s)
                planes[r, s][dst] = x[src]                  # borders stay zero from allocation
        flat = planes.reshape(2, 2, c, n, hq * wq)
        col = self.conv_columns(ws, k, 4 * m, x.dtype)
        col8 = col[:k].reshape(c, kh, kw, 2, 2, n, run)
        for p in range(kh):
            for q in range(kw):
                for a in (0, 1):
                    for bb in (0, 1):
                        u, v = a + p, bb + q
                        off = (u // 2) * wq + v // 2
                        col8[:, p, q, a, bb] = flat[u % 2, v % 2, :, :, off:off + run]
        y = self.conv_gemm_forward(w, b, col, ws).reshape(f, 4, m)
        arg = self._max4(y, ws, out)
        if relu:
            xp.maximum(out, 0, out=out)
        return (x.shape, col, arg)

    def _max4(self, y, ws, out):
        """Write the max over axis 1 of y (F, 4, M) into ``out`` (F, M); return the index of the first maximum (uint8).

        Vectorised maxima; the index is built from three comparisons as 2*g23 + (g3 if g23 else g1) without any
        masked assignment.
        """
        xp = self.xp
        f, _, m = y.shape
        m23 = cached_buffer(ws, "m23", (f, m), y.dtype, xp)
        g1, g3, g23 = (cached_buffer(ws, key, (f, m), numpy.bool_, xp) for key in ("g1", "g3", "g23"))
        xp.greater(y[:, 1], y[:, 0], out=g1)
        xp.greater(y[:, 3], y[:, 2], out=g3)
        xp.maximum(y[:, 0], y[:, 1], out=out)
        xp.maximum(y[:, 2], y[:, 3], out=m23)
        xp.greater(m23, out, out=g23)
        xp.maximum(out, m23, out=out)
        arg = cached_buffer(ws, "arg", (f, m), numpy.uint8, xp)
        u1, u3, u23 = g1.view(numpy.uint8), g3.view(numpy.uint8), g23.view(numpy.uint8)
        xp.bitwise_xor(u1, u3, out=arg)
        xp.bitwise_and(arg, u23, out=arg)
        xp.bitwise_xor(arg, u1, out=arg)                   # g3 where g23 else g1
        xp.left_shift(u23, 1, out=u23)
        xp.bitwise_or(arg, u23, out=arg)
        return arg

    @staticmethod
    def _parity_slices(xshape, pad, r, s):
        """Return (source slices of x, destination slices of a parity plane) for padded-row parity r, column s;
        ``pad`` is the (h, w) padding."""
        _, _, h, wd = xshape
        ph, pw = pad
        h0, w0 = (r - ph) % 2, (s - pw) % 2
        nh, nw = len(range(h0, h, 2)), len(range(w0, wd, 2))
        i0, j0 = (h0 + ph) // 2, (w0 + pw) // 2
        return ((slice(None), slice(None), slice(h0, h, 2), slice(w0, wd, 2)),
                (slice(None), slice(None), slice(i0, i0 + nh), slice(j0, j0 + nw)))

    def conv2d_maxpool_backward(self, dy, cache, w, dw, db, need_dx: bool = True, ws=None):
        """Write dL/dw, dL/db of ``conv2d_maxpool_forward`` into ``dw`` (F, C, kh, kw) and ``db`` (F,); return dx.

        dy: (F, N, Ho//2, Wo//2); returns dx: (C, N, H, W), or None when ``need_dx`` is False.
        """
        xp = self.xp
        ws = {} if ws is None else ws
        xshape, pad, hh, wh, wq, relu, parts, caches, out = cache
        c, n, h, wd = xshape
        run = hh * wq
        subs = self._part_workspaces(ws, len(parts))
        dx = cached_buffer(ws, "dx", xshape, dy.dtype, xp) if need_dx else None
        grads = [(dw, db)] if len(parts) == 1 else \
            [(cached_buffer(sub, "dw", dw.shape, dw.dtype, xp), cached_buffer(sub, "db", db.shape, db.dtype, xp))
             for sub in subs]

        def part(i):
            n0, n1 = parts[i]
            self._conv_pool_part_backward(dy[:, n0:n1], caches[i], w, grads[i][0], grads[i][1],
                                          None if dx is None else dx[:, n0:n1], subs[i], pad, hh, wh, wq,
                                          out[:, n0 * run:n1 * run] if relu else None)

        self._run_parts(part, len(parts))
        if len(parts) > 1:
            dw[...] = grads[0][0]
            db[...] = grads[0][1]
            for gw, gb in grads[1:]:
                dw += gw
                db += gb
        return dx

    def _conv_pool_part_backward(self, dy, cache, w, dw, db, dx, ws, pad, hh, wh, wq, relu_out):
        """The fused backward of one batch part: overwrites dw/db, writes dx (a view, or None: not needed)."""
        xp = self.xp
        xshape, col, arg = cache
        c, n, h, wd = xshape
        f, _, kh, kw = w.shape
        run = hh * wq
        m = n * run
        hq = (h + 2 * pad[0] + 1) // 2 + 1
        if self._runs_cpu_kernels(dy.dtype):                # the same gradients, routed and summed in C
            dconv = cached_buffer(ws, "dconv", (f, 4, m), dy.dtype, xp)
            cpu_kernels.pool_grad(dy, relu_out, arg, dconv, wq)
            dcol = self.conv_gemm_backward(dconv.reshape(f, 4 * m), col, w, dw, db, dx is not None, ws)
            if dcol is not None:
                cpu_kernels.col2im(dcol, dx, kh, kw, pad, hq, wq, run)
            return
        dyq = cached_buffer(ws, "dyq", (f, n, hh, wq), dy.dtype, xp, zero=True)
        dyq[:, :, :, :wh] = dy                              # junk columns keep a zero gradient
        dy2 = dyq.reshape(f, m)
        hit = cached_buffer(ws, "hit", (f, m), numpy.bool_, xp)
        if relu_out is not None:                            # the fused ReLU's mask: no gradient where max <= 0
            xp.greater(relu_out, 0, out=hit)
            dy2 *= hit
        dconv = cached_buffer(ws, "dconv", (f, 4, m), dy.dtype, xp)
        for t in range(4):
            xp.equal(arg, t, out=hit)
            xp.multiply(dy2, hit, out=dconv[:, t])
        dcol = self.conv_gemm_backward(dconv.reshape(f, 4 * m), col, w, dw, db, dx is not None, ws)
        if dcol is None:
            return
        dcol8 = dcol.reshape(c, kh, kw, 2, 2, n, run)
        dplanes = cached_buffer(ws, "dplanes", (2, 2, c, n, hq, wq), dy.dtype, xp)
        dplanes.fill(0)
        dflat = dplanes.reshape(2, 2, c, n, hq * wq)
        for p in range(kh):
            for q in range(kw):
                for a in (0, 1):
                    for bb in (0, 1):
                        u, v = a + p, bb + q
                        off = (u // 2) * wq + v // 2
                        dflat[u % 2, v % 2, :, :, off:off + run] += dcol8[:, p, q, a, bb]
        for r in (0, 1):
            for s in (0, 1):
                src, dst = self._parity_slices(xshape, pad, r, s)
                dx[src] = dplanes[r, s][dst]

    # ---- pooling --------------------------------------------------------------------------------------------------
    @staticmethod
    def _pool_shape(xshape, size, stride, kind):
        """Return ((kh, kw), (sh, sw), (Ho, Wo)) of a pooling without padding; ValueError when the window misfits."""
        (kh, kw), (sh, sw) = pair(size, "size"), pair(stride, "stride")
        _, _, h, wd = xshape
        if kh < 1 or kw < 1 or sh < 1 or sw < 1:
            raise ValueError(f"{kind}: window and stride must be >= 1, got {kh}x{kw} and {sh}x{sw}")
        ho, wo = conv_output_size(h, kh, sh, 0), conv_output_size(wd, kw, sw, 0)
        if ho < 1 or wo < 1:
            raise ValueError(f"{kind}: input {h}x{wd} is smaller than the {kh}x{kw} window")
        return (kh, kw), (sh, sw), (ho, wo)

    def maxpool_forward(self, x, size, stride, ws=None):
        """Return ``(y, cache)`` of max pooling over ``size`` windows (int or (kh, kw)), no padding.

        x: (C, N, H, W); y: (C, N, Ho, Wo) with ``Ho = (H - kh)//stride_h + 1`` (likewise Wo); rows/columns past the
        last full window are ignored.  The gradient goes to the first maximum of each window in row-major window
        order (PyTorch's choice), recorded in ``cache`` as a uint8 window offset ``p*kw + q`` per output.
        """
        xp = self.xp
        ws = {} if ws is None else ws
        (kh, kw), (sh, sw), (ho, wo) = self._pool_shape(x.shape, size, stride, "maxpool")
        if kh * kw > 256:
            raise ValueError(f"maxpool: a {kh}x{kw} window has more offsets than the uint8 argmax can hold "
                             f"(at most 256)")
        c, n, _, _ = x.shape
        y = cached_buffer(ws, "y", (c, n, ho, wo), x.dtype, xp)
        arg = cached_buffer(ws, "arg", (c, n, ho, wo), numpy.uint8, xp)
        gt = cached_buffer(ws, "gt", (c, n, ho, wo), numpy.bool_, xp)
        last_h, last_w = sh * (ho - 1) + 1, sw * (wo - 1) + 1
        y[...] = x[:, :, 0:last_h:sh, 0:last_w:sw]
        arg.fill(0)
        t = 0
        for p in range(kh):
            for q in range(kw):
                if t:
                    cand = x[:, :, p:p + last_h:sh, q:q + last_w:sw]
                    xp.greater(cand, y, out=gt)
                    xp.multiply(arg, ~gt, out=arg)         # masked assignment arg[gt] = t without copyto(where=),
                    arg += gt.view(numpy.uint8) * numpy.uint8(t)   # which is ~40x slower in numpy
                    xp.maximum(y, cand, out=y)
                t += 1
        return y, (x.shape, (kh, kw), (sh, sw), arg)

    def _window_views(self, dx, dy_shape, size, stride):
        """Yield, for every window offset (p, q) in row-major order, the view of ``dx`` that offset reads."""
        (kh, kw), (sh, sw) = size, stride
        _, _, ho, wo = dy_shape
        last_h, last_w = sh * (ho - 1) + 1, sw * (wo - 1) + 1
        for p in range(kh):
            for q in range(kw):
                yield dx[:, :, p:p + last_h:sh, q:q + last_w:sw]

    @staticmethod
    def _pool_dx_needs_zero(xshape, size, stride, pooled):
        """Return (overlap, zero first): windows overlap, or some input element is in no window."""
        (kh, kw), (sh, sw), (ho, wo) = size, stride, pooled
        overlap = sh < kh or sw < kw
        covered = sh == kh and sw == kw and xshape[2] == kh * ho and xshape[3] == kw * wo
        return overlap, overlap or not covered

    def maxpool_backward(self, dy, cache, ws=None):
        """Return dx (C, N, H, W) of ``maxpool_forward`` for dy (C, N, Ho, Wo): dy routed to each window's argmax."""
        xp = self.xp
        ws = {} if ws is None else ws
        xshape, size, stride, arg = cache
        dx = cached_buffer(ws, "dx", xshape, dy.dtype, xp)
        overlap, zero = self._pool_dx_needs_zero(xshape, size, stride, dy.shape[2:])
        if zero:
            dx.fill(0)
        hit = cached_buffer(ws, "hit", dy.shape, numpy.bool_, xp)
        for t, dst in enumerate(self._window_views(dx, dy.shape, size, stride)):
            xp.equal(arg, t, out=hit)
            if overlap:
                dst += dy * hit
            else:
                xp.multiply(dy, hit, out=dst)
        return dx

    def avgpool_forward(self, x, size, stride, ws=None):
        """Return ``(y, cache)`` of average pooling over ``size`` windows (int or (kh, kw)), no padding.

        x: (C, N, H, W); y: (C, N, Ho, Wo) as ``maxpool_forward``; ``y = (sum of the window in row-major order) *
        scale`` with ``scale = 1/(kh*kw)`` rounded to x's dtype (the GPU kernel rounds the same way).
        """
        xp = self.xp
        ws = {} if ws is None else ws
        (kh, kw), (sh, sw), (ho, wo) = self._pool_shape(x.shape, size, stride, "avgpool")
        c, n, _, _ = x.shape
        y = cached_buffer(ws, "y", (c, n, ho, wo), x.dtype, xp)
        for t, src in enumerate(self._window_views(x, y.shape, (kh, kw), (sh, sw))):
            if t:
                y += src
            else:
                y[...] = src
        y *= x.dtype.type(1.0 / (kh * kw))
        return y, (x.shape, (kh, kw), (sh, sw))

    def avgpool_backward(self, dy, cache, ws=None):
        """Return dx (C, N, H, W) of ``avgpool_forward``: ``dy * scale`` added to every element of each window."""
        xp = self.xp
        ws = {} if ws is None else ws
        xshape, size, stride = cache
        dx = cached_buffer(ws, "dx", xshape, dy.dtype, xp)
        overlap, zero = self._pool_dx_needs_zero(xshape, size, stride, dy.shape[2:])
        if zero:
            dx.fill(0)
        g = cached_buffer(ws, "g", dy.shape, dy.dtype, xp)
        xp.multiply(dy, dy.dtype.type(1.0 / (size[0] * size[1])), out=g)
        for dst in self._window_views(dx, dy.shape, size, stride):
            if overlap:
                dst += g
            else:
                dst[...] = g
        return dx

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
