"""CupyOps: the network's primitives on CuPy arrays, with the kernels of ``kernels/conv.cu`` and ``kernels/pool.cu``.

A ``NumpyOps`` subclass (asyncsgd/model/ops.py states every contract): it overrides the convolution and pooling
methods, whose numpy versions rely on ``as_strided`` views or one pass per window offset, and inherits everything
else, which is written against ``self.xp`` and runs on CuPy unchanged (GEMMs go to cuBLAS through ``cupy.matmul``).

Caches have exactly NumpyOps' formats, so a forward pass of one class may be followed by the backward pass of the
other.  Workspace buffers follow NumpyOps' rule: returned arrays may live in ``ws`` until the next call with it.
"""
from __future__ import annotations

import numpy

from asyncsgd import backend
from asyncsgd.gpu import kernels
from asyncsgd.model.ops import NumpyOps, cached_buffer, conv_output_size

__all__ = ["CupyOps"]


def _ints(*values):
    return tuple(numpy.int32(v) for v in values)


class CupyOps(NumpyOps):
    """NumpyOps on the current CUDA device: conv (im2col/col2im kernels + cuBLAS) and max-pool kernels."""

    name = "cupy"

    def __init__(self):
        cupy = backend._import_cupy()
        if cupy is None:
            raise RuntimeError("CupyOps needs CuPy (pip install 'asyncsgd[gpu]'); use --device cpu without it")
        self.xp = cupy

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
    def im2col(self, xpad, kh: int, kw: int, stride: int, ho: int, wo: int, out):
        """Copy windows of padded ``xpad`` (C, N, Hp, Wp) into ``out`` (C, kh, kw, N, Ho, Wo) with one kernel:

        ``out[c, p, q, n, i, j] = xpad[c, n, i*stride + p, j*stride + q]``; both C-contiguous, one dtype.
        """
        self._check("xpad", xpad, 4)
        self._check("out", out, 6, xpad.dtype)
        c, n, hp, wp = xpad.shape
        want = (c, kh, kw, n, ho, wo)
        if out.shape != want:
            raise ValueError(f"im2col: out must have shape {want}, got {out.shape}")
        if ho > conv_output_size(hp, kh, stride, 0) or wo > conv_output_size(wp, kw, stride, 0):
            raise ValueError(f"im2col: {ho}x{wo} windows of {kh}x{kw} at stride {stride} do not fit in {hp}x{wp}")
        self._im2col(xpad, out, kh, kw, stride, 0, ho, wo)
        return out

    def col2im_add(self, dcol, stride: int, out):
        """Add ``dcol`` (C, kh, kw, N, Ho, Wo) into ``out`` (C, N, Hp, Wp) with one gathering kernel (no atomics):

        ``out[c, n, i*stride + p, j*stride + q] += dcol[c, p, q, n, i, j]``; both C-contiguous, one dtype.
        """
        self._check("dcol", dcol, 6)
        self._check("out", out, 4, dcol.dtype)
        c, kh, kw, n, ho, wo = dcol.shape
        if out.shape[:2] != (c, n) or out.shape[2] < stride * (ho - 1) + kh or out.shape[3] < stride * (wo - 1) + kw:
            raise ValueError(f"col2im_add: out {out.shape} cannot hold {ho}x{wo} windows of {kh}x{kw} at stride "
                             f"{stride} for {c} channels and {n} samples")
        self._col2im(dcol, out, kh, kw, stride, 0, ho, wo, accumulate=True)
        return out

    def _im2col(self, x, col, kh, kw, stride, pad, ho, wo):
        c, n, h, w = x.shape
        kernels.kernel("conv", "im2col", x.dtype)(
            (kernels.launch_blocks(col.size),), (kernels.THREADS,),
            (x, col) + _ints(c, n, h, w, kh, kw, stride, stride, pad, pad, ho, wo))

    def _col2im(self, dcol, dx, kh, kw, stride, pad, ho, wo, accumulate):
        c, n, h, w = dx.shape
        kernels.kernel("conv", "col2im", dx.dtype)(
            (kernels.launch_blocks(dx.size),), (kernels.THREADS,),
            (dcol, dx) + _ints(c, n, h, w, kh, kw, stride, stride, pad, pad, ho, wo, int(accumulate)))

    # ---- convolution ----------------------------------------------------------------------------------------------
    def conv2d_forward(self, x, w, b, stride: int, pad: int, ws=None):
        """NumpyOps.conv2d_forward with the padding done inside the im2col kernel (no padded copy of x).

        x: (C, N, H, W); w: (F, C, kh, kw); b: (F,); returns ``(y (F, N, Ho, Wo), cache)``, cache in NumpyOps' format.
        """
        xp = self.xp
        ws = {} if ws is None else ws
        self._check("x", x, 4, contiguous=False)
        self._check("w", w, 4, x.dtype, contiguous=False)
        self._check("b", b, 1, x.dtype, contiguous=False)
        x = xp.ascontiguousarray(x)
        c, n, h, wd = x.shape
        f, c2, kh, kw = w.shape
        if c2 != c:
            raise ValueError(f"conv2d: input has {c} channels but the weights expect {c2}")
        if b.shape != (f,):
            raise ValueError(f"conv2d: bias must have shape ({f},), got {b.shape}")
        ho, wo = conv_output_size(h, kh, stride, pad), conv_output_size(wd, kw, stride, pad)
        if ho < 1 or wo < 1:
            raise ValueError(f"conv2d: input {h}x{wd} is smaller than the {kh}x{kw} kernel (pad {pad})")
        k = c * kh * kw
        p = n * ho * wo
        col = ws.get("col")
        if col is None or col.shape != (k + 1, p) or col.dtype != x.dtype:
            col = xp.empty((k + 1, p), x.dtype)
            col[k] = 1                                    # the bias row, written once per buffer
            ws["col"] = col
        self._im2col(x, col[:k], kh, kw, stride, pad, ho, wo)
        wb = cached_buffer(ws, "wb", (f, k + 1), w.dtype, xp)
        wb[:, :k] = w.reshape(f, k)
        wb[:, k] = b
        y = cached_buffer(ws, "y", (f, p), x.dtype, xp)
        xp.matmul(wb, col, out=y)
        cache = (x.shape, stride, pad, ho, wo, col, (c, n, h + 2 * pad, wd + 2 * pad))
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
        dcol = self.conv_backward_gemms(dy2, col, w, dw, db, need_dx, ws)
        if dcol is None:
            return None
        dx = cached_buffer(ws, "dx", xshape, dy.dtype, xp)
        self._col2im(dcol, dx, kh, kw, stride, pad, ho, wo, accumulate=False)
        return dx

    # ---- max pooling ----------------------------------------------------------------------------------------------
    def maxpool_forward(self, x, size: int, stride: int, ws=None):
        """NumpyOps.maxpool_forward in one kernel: y (C, N, Ho, Wo) and the uint8 window index of each maximum."""
        xp = self.xp
        ws = {} if ws is None else ws
        self._check("x", x, 4, contiguous=False)
        if size * size > 256:
            raise ValueError(f"maxpool: a {size}x{size} window has more offsets than the uint8 argmax can hold "
                             f"(at most 16x16)")
        x = xp.ascontiguousarray(x)
        c, n, h, wd = x.shape
        ho, wo = conv_output_size(h, size, stride, 0), conv_output_size(wd, size, stride, 0)
        if ho < 1 or wo < 1:
            raise ValueError(f"maxpool: input {h}x{wd} is smaller than the {size}x{size} window")
        y = cached_buffer(ws, "y", (c, n, ho, wo), x.dtype, xp)
        arg = cached_buffer(ws, "arg", (c, n, ho, wo), numpy.uint8, xp)
        kernels.kernel("pool", "maxpool_forward", x.dtype)(
            (kernels.launch_blocks(y.size),), (kernels.THREADS,),
            (x, y, arg) + _ints(c, n, h, wd, size, stride, ho, wo))
        return y, (x.shape, size, stride, arg)

    def maxpool_backward(self, dy, cache, ws=None):
        """NumpyOps.maxpool_backward in one gathering kernel: dx (C, N, H, W), every element written."""
        xp = self.xp
        ws = {} if ws is None else ws
        xshape, size, stride, arg = cache
        self._check("dy", dy, 4, contiguous=False)
        if dy.shape != arg.shape:
            raise ValueError(f"maxpool_backward: dy must have the pooled shape {arg.shape}, got {dy.shape}")
        dy = xp.ascontiguousarray(dy)
        c, n, h, wd = xshape
        _, _, ho, wo = dy.shape
        dx = cached_buffer(ws, "dx", xshape, dy.dtype, xp)
        kernels.kernel("pool", "maxpool_backward", dy.dtype)(
            (kernels.launch_blocks(dx.size),), (kernels.THREADS,),
            (dy, arg, dx) + _ints(c, n, h, wd, size, stride, ho, wo))
        return dx
