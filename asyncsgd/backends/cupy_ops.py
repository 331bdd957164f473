"""CupyOps: the compute object of a GPU rank, with the kernels of ``kernels/*.cu``.

A ``NumpyOps`` subclass (``asyncsgd.backends.numpy_ops`` and its mixins state every contract).  It overrides only what differs or what its
kernels speed up: host/device moves and pinned staging buffers, top-k selection and the fused optimizer step
(``kernels/sparse.cu``, ``kernels/update.cu`` through ``asyncsgd.backends.cuda_sparse``), and the convolution and pooling
methods, whose numpy versions rely on ``as_strided`` views or one pass per window offset.  Everything else (ReLU,
tanh, sigmoid, dense layers, the loss) is written against ``self.xp`` and runs on CuPy unchanged (GEMMs go to cuBLAS
through ``cupy.matmul``, the convolution's through the shared ``conv_gemm_*`` helper).

Caches have exactly NumpyOps' formats, so a forward pass of one class may be followed by the backward pass of the
other.  Workspace buffers follow NumpyOps' rule: returned arrays may live in ``ws`` until the next call with it.
"""
from __future__ import annotations

import numpy

from asyncsgd.backends import device as _device
from asyncsgd.backends import cuda_kernels as kernels
from asyncsgd.backends.numpy_ops import NumpyOps
from asyncsgd.backends.workspace import cached_buffer, conv_output_size, pair

__all__ = ["CupyOps"]


def _ints(*values):
    return tuple(numpy.int32(v) for v in values)


def _current_device(cupy):
    try:
        return int(cupy.cuda.Device().id)
    except Exception:           # the CPU emulation of the tests has no devices
        return 0


class CupyOps(NumpyOps):
    """NumpyOps on one CUDA device: kernels for conv (im2col/col2im + cuBLAS), pooling, top-k and the update."""

    name = "cupy"
    device = "gpu"
    is_gpu = True

    def __init__(self, device_id: int | None = None):
        cupy = _device.import_cupy()
        if cupy is None:
            raise RuntimeError("CupyOps needs CuPy (pip install 'asyncsgd[gpu]'); use --device cpu without it")
        self.xp = cupy
        if device_id is not None:
            cupy.cuda.Device(int(device_id)).use()
        self.device_id = int(device_id) if device_id is not None else _current_device(cupy)

    # ---- memory: host/device moves and staging --------------------------------------------------------------------
    def to_host(self, a, out=None):
        """Return device array ``a`` as a numpy array (a copy), into ``out`` (pinned or not) when given."""
        if not isinstance(a, self.xp.ndarray):
            return NumpyOps.to_host(self, a, out)
        if out is not None:
            a.get(out=out)
            return out
        return a.get()

    def to_device(self, a, out=None):
        """Return host array ``a`` as a device array, copied into device array ``out`` when given."""
        if out is not None:
            out.set(numpy.ascontiguousarray(a))
            return out
        return self.xp.asarray(a)

    def staging_buffer(self, n: int, dtype=numpy.float32):
        """Return a pinned (page-locked) host array (n,): device copies from and to it run at full speed."""
        import cupyx
        return cupyx.empty_pinned(int(n), dtype=dtype)

    def synchronize(self):
        """Wait for the work queued on the current stream."""
        self.xp.cuda.get_current_stream().synchronize()

    # ---- sparse pushes and the optimizer step (kernels/sparse.cu, kernels/update.cu) ------------------------------
    def select_topk(self, accrued, fraction: float, residual):
        """NumpyOps.select_topk on the device without sorting (asyncsgd.backends.cuda_sparse.select_topk)."""
        from asyncsgd.backends import cuda_sparse as sparse
        return sparse.select_topk(accrued, fraction, residual)

    def scatter_add(self, dense, idx, values):
        """NumpyOps.scatter_add with one kernel."""
        from asyncsgd.backends import cuda_sparse as sparse
        return sparse.scatter_add(dense, idx, values)

    def sgd_update(self, params, grad, *, lr: float, momentum: float = 0.0, velocity=None, weight: float = 1.0,
                   sum_sq=None, eps: float = 1e-8, accrued=None):
        """NumpyOps.sgd_update in one fused kernel (each element read and written once), bit-identical to numpy."""
        from asyncsgd.backends import cuda_sparse as sparse
        sparse.fused_update(params, grad, lr=lr, momentum=momentum, velocity=velocity, weight=weight,
                            sum_sq=sum_sq, eps=eps, accrued=accrued)

    # ---- input checks ---------------------------------------------------------------------------------------------
    def _check(self, name, a, ndim, dtype=None, contiguous=True):
        """Raise TypeError/ValueError unless ``a`` is a float32/float64 cupy array of ``ndim`` dims (and ``dtype``)."""
        if not isinstance(a, self.xp.ndarray):
            raise TypeError(f"{name} must be a cupy.ndarray, got {type(a).__module__}.{type(a).__name__}")
        if dtype is None and a.dtype not in (numpy.float32, numpy.float64):
            raise TypeError(f"{name} must be float32 or float64, got {a.dtype}")
        if dtype is not None and a.dtype != dtype:
            raise TypeError(f"{name} must have dtype {numpy.dtype(dtype)}, got {a.dtype}")
        if a.ndim != ndim:
            raise ValueError(f"{name} must have {ndim} dimensions, got shape {a.shape}")
        if contiguous and not a.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous, got strides {a.strides} for shape {a.shape}")

    # ---- im2col / col2im (the building blocks, same contracts as NumpyOps) ----------------------------------------
    def im2col(self, xpad, kh: int, kw: int, stride, ho: int, wo: int, out):
        """Copy windows of padded ``xpad`` (C, N, Hp, Wp) into ``out`` (C, kh, kw, N, Ho, Wo) with one kernel:

        ``out[c, p, q, n, i, j] = xpad[c, n, i*stride_h + p, j*stride_w + q]``; both C-contiguous, one dtype.
        """
        sh, sw = pair(stride, "stride")
        self._check("xpad", xpad, 4)
        self._check("out", out, 6, xpad.dtype)
        c, n, hp, wp = xpad.shape
        want = (c, kh, kw, n, ho, wo)
        if out.shape != want:
            raise ValueError(f"im2col: out must have shape {want}, got {out.shape}")
        if ho > conv_output_size(hp, kh, sh, 0) or wo > conv_output_size(wp, kw, sw, 0):
            raise ValueError(f"im2col: {ho}x{wo} windows of {kh}x{kw} at stride {sh}x{sw} do not fit in {hp}x{wp}")
        self._im2col(xpad, out, kh, kw, (sh, sw), (0, 0), ho, wo)
        return out

    def col2im_add(self, dcol, stride, out):
        """Add ``dcol`` (C, kh, kw, N, Ho, Wo) into ``out`` (C, N, Hp, Wp) with one gathering kernel (no atomics):

        ``out[c, n, i*stride_h + p, j*stride_w + q] += dcol[c, p, q, n, i, j]``; both C-contiguous, one dtype.
        """
        sh, sw = pair(stride, "stride")
        self._check("dcol", dcol, 6)
        self._check("out", out, 4, dcol.dtype)
        c, kh, kw, n, ho, wo = dcol.shape
        if out.shape[:2] != (c, n) or out.shape[2] < sh * (ho - 1) + kh or out.shape[3] < sw * (wo - 1) + kw:
            raise ValueError(f"col2im_add: out {out.shape} cannot hold {ho}x{wo} windows of {kh}x{kw} at stride "
                             f"{sh}x{sw} for {c} channels and {n} samples")
        self._col2im(dcol, out, kh, kw, (sh, sw), (0, 0), ho, wo, accumulate=True)
        return out

    def _im2col(self, x, col, kh, kw, stride, pad, ho, wo):
        c, n, h, w = x.shape
        kernels.kernel("conv", "im2col", x.dtype)(
            (kernels.launch_blocks(col.size),), (kernels.THREADS,),
            (x, col) + _ints(c, n, h, w, kh, kw, stride[0], stride[1], pad[0], pad[1], ho, wo))

    def _col2im(self, dcol, dx, kh, kw, stride, pad, ho, wo, accumulate):
        c, n, h, w = dx.shape
        kernels.kernel("conv", "col2im", dx.dtype)(
            (kernels.launch_blocks(dx.size),), (kernels.THREADS,),
            (dcol, dx) + _ints(c, n, h, w, kh, kw, stride[0], stride[1], pad[0], pad[1], ho, wo, int(accumulate)))

    # ---- convolution ----------------------------------------------------------------------------------------------
    def conv2d_forward(self, x, w, b, stride, pad, ws=None):
        """NumpyOps.conv2d_forward with the padding done inside the im2col kernel (no padded copy of x).

        x: (C, N, H, W); w: (F, C, kh, kw); b: (F,); returns ``(y (F, N, Ho, Wo), cache)``, cache in NumpyOps' format.
        """
        xp = self.xp
        ws = {} if ws is None else ws
        stride, pad = pair(stride, "stride"), pair(pad, "pad")
        self._check("x", x, 4, contiguous=False)
        self._check("w", w, 4, x.dtype, contiguous=False)
        self._check("b", b, 1, x.dtype, contiguous=False)
        x = xp.ascontiguousarray(x)
        ho, wo = self._conv_shape(x.shape, w.shape, stride, pad)
        c, n, h, wd = x.shape
        f, _, kh, kw = w.shape
        if b.shape != (f,):
            raise ValueError(f"conv2d: bias must have shape ({f},), got {b.shape}")
        k = c * kh * kw
        col = self.conv_columns(ws, k, n * ho * wo, x.dtype)
        self._im2col(x, col[:k], kh, kw, stride, pad, ho, wo)
        y = self.conv_gemm_forward(w, b, col, ws)
        cache = (x.shape, stride, pad, ho, wo, col, (c, n, h + 2 * pad[0], wd + 2 * pad[1]))
        return y.reshape(f, n, ho, wo), cache

    def conv2d_backward(self, dy, cache, w, dw, db, need_dx: bool = True, ws=None):
        """NumpyOps.conv2d_backward with col2im writing dx (C, N, H, W) directly (C-contiguous, no padded buffer).

        dy: (F, N, Ho, Wo); dw (F, C, kh, kw) and db (F,) are OVERWRITTEN; returns dx or None when not need_dx.
        """
        xp = self.xp
        ws = {} if ws is None else ws
        xshape, stride, pad, ho, wo, col, _ = cache
        c, n, h, wd = xshape
        f, _, kh, kw = w.shape
        self._check("dy", dy, 4, col.dtype, contiguous=False)
        if dy.shape != (f, n, ho, wo):
            raise ValueError(f"conv2d_backward: dy must have shape {(f, n, ho, wo)}, got {dy.shape}")
        dy2 = xp.ascontiguousarray(dy).reshape(f, n * ho * wo)
        dcol = self.conv_gemm_backward(dy2, col, w, dw, db, need_dx, ws)
        if dcol is None:
            return None
        dx = cached_buffer(ws, "dx", xshape, dy.dtype, xp)
        self._col2im(dcol, dx, kh, kw, stride, pad, ho, wo, accumulate=False)
        return dx

    # ---- pooling --------------------------------------------------------------------------------------------------
    def maxpool_forward(self, x, size, stride, ws=None):
        """NumpyOps.maxpool_forward in one kernel: y (C, N, Ho, Wo) and the uint8 window offset of each maximum."""
        ws = {} if ws is None else ws
        x, window, step, y = self._pool_input(x, size, stride, "maxpool", ws)
        arg = cached_buffer(ws, "arg", y.shape, numpy.uint8, self.xp)
        self._pool_kernel("maxpool_forward", (x, y, arg), y, x.shape, window, step, y.shape[2:])
        return y, (x.shape, window, step, arg)

    def maxpool_backward(self, dy, cache, ws=None):
        """NumpyOps.maxpool_backward in one gathering kernel: dx (C, N, H, W), every element written."""
        ws = {} if ws is None else ws
        xshape, window, step, arg = cache
        dy = self._pool_dy(dy, arg.shape)
        dx = cached_buffer(ws, "dx", xshape, dy.dtype, self.xp)
        self._pool_kernel("maxpool_backward", (dy, arg, dx), dx, xshape, window, step, dy.shape[2:])
        return dx

    def avgpool_forward(self, x, size, stride, ws=None):
        """NumpyOps.avgpool_forward in one kernel (same summation order and scale rounding: equal bit for bit)."""
        ws = {} if ws is None else ws
        x, window, step, y = self._pool_input(x, size, stride, "avgpool", ws)
        self._pool_kernel("avgpool_forward", (x, y), y, x.shape, window, step, y.shape[2:],
                          x.dtype.type(1.0 / (window[0] * window[1])))
        return y, (x.shape, window, step)

    def avgpool_backward(self, dy, cache, ws=None):
        """NumpyOps.avgpool_backward in one gathering kernel: dx (C, N, H, W), every element written."""
        ws = {} if ws is None else ws
        xshape, (kh, kw), (sh, sw) = cache
        c, n, h, wd = xshape
        pooled = (c, n, conv_output_size(h, kh, sh, 0), conv_output_size(wd, kw, sw, 0))
        dy = self._pool_dy(dy, pooled)
        dx = cached_buffer(ws, "dx", xshape, dy.dtype, self.xp)
        self._pool_kernel("avgpool_backward", (dy, dx), dx, xshape, (kh, kw), (sh, sw), pooled[2:],
                          dy.dtype.type(1.0 / (kh * kw)))
        return dx

    def _pool_input(self, x, size, stride, kind, ws):
        """Check x (C, N, H, W) of a ``kind`` pooling; return (contiguous x, (kh, kw), (sh, sw), y buffer)."""
        self._check("x", x, 4, contiguous=False)
        window, step, (ho, wo) = self._pool_shape(x.shape, size, stride, kind)
        x = self.xp.ascontiguousarray(x)
        c, n, _, _ = x.shape
        return x, window, step, cached_buffer(ws, "y", (c, n, ho, wo), x.dtype, self.xp)

    def _pool_dy(self, dy, pooled_shape):
        self._check("dy", dy, 4, contiguous=False)
        if dy.shape != tuple(pooled_shape):
            raise ValueError(f"pool backward: dy must have the pooled shape {tuple(pooled_shape)}, got {dy.shape}")
        return self.xp.ascontiguousarray(dy)

    @staticmethod
    def _pool_kernel(name, arrays, out, xshape, window, step, pooled, *scalars):
        """Launch ``name`` of kernels/pool.cu, one thread per element of ``out``, with the arguments every pooling
        kernel takes: ``arrays``, then C, N, H, W, kh, kw, sh, sw, Ho, Wo as int32, then ``scalars``."""
        c, n, h, wd = xshape
        kernels.kernel("pool", name, out.dtype)(
            (kernels.launch_blocks(out.size),), (kernels.THREADS,),
            tuple(arrays) + _ints(c, n, h, wd, *window, *step, *pooled) + scalars)
