"""The compiled CPU kernels of the fused convolution + 2x2 max pooling (``kernels/conv_pool_cpu.c``).

NumpyOps' fused conv+pool spends as long in the copies and masks around its GEMMs (im2col, the pooling maxima, the
routed pooled gradient, col2im) as in the GEMMs, because numpy runs each as whole-array passes over megabytes.  These
four kernels do the same float operations in the same order (results are bit-identical) one (channel, image) pair
at a time, while its planes sit in the L1 cache.

They are an optional extension module, ``_asyncsgd_cpu``, that ``pip install`` builds with the C compiler and Python
headers it finds (a source checkout: ``python setup.py build_ext --inplace``); where it is missing, or was built from
another version of the source, ``enabled()`` is False and NumpyOps runs its numpy code.  ``ASYNCSGD_CPU_KERNELS=0``
turns them off (for comparing the two paths).  The module is top-level, not inside the package, so that a source
checkout run from its root (the tests, ``python -m asyncsgd.train``) still finds the copy ``pip install .`` built.

Each wrapper checks dtypes, shapes and element-aligned strides before passing raw pointers to C, which checks
nothing.
"""
from __future__ import annotations

import functools

import numpy

from asyncsgd.runtime.env import CPU_KERNELS_ENV, cpu_kernels_switch

__all__ = ["ENV", "switch", "enabled", "available", "im2col", "max4", "pool_grad", "col2im"]

ABI_VERSION = 2         # kernels/conv_pool_cpu.c's ABI_VERSION: a stale build of older source is not used


@functools.lru_cache(maxsize=None)
def _module():
    try:
        import _asyncsgd_cpu as mod
    except ImportError:
        return None
    return mod if getattr(mod, "ABI_VERSION", None) == ABI_VERSION else None


def available() -> bool:
    """True when the compiled module is importable and matches this source (whatever ASYNCSGD_CPU_KERNELS says)."""
    return _module() is not None


ENV = CPU_KERNELS_ENV
switch = cpu_kernels_switch   # what ASYNCSGD_CPU_KERNELS asks for (asyncsgd.runtime.env)


def enabled() -> bool:
    """True when the kernels may be used: built, current, and not turned off by ``ASYNCSGD_CPU_KERNELS=0``."""
    return switch() and available()


def _strides(a, ndim):
    if a.ndim != ndim:
        raise ValueError(f"cpu kernel: expected a {ndim}-d array, got shape {a.shape}")
    if any(s % a.itemsize for s in a.strides):
        raise ValueError("cpu kernel: strides are not multiples of the element size")
    return [s // a.itemsize for s in a.strides]


def _f32(*arrays):
    for a in arrays:
        if a.dtype != numpy.float32:
            raise TypeError(f"cpu kernel: float32 arrays only, got {a.dtype}")


def _writable(*arrays):
    for a in arrays:
        if not a.flags.writeable:
            raise ValueError("cpu kernel: an output array is read-only")


def _contiguous(a, shape):
    if a.shape != tuple(shape) or not a.flags.c_contiguous:
        raise ValueError(f"cpu kernel: expected a C-contiguous array of shape {tuple(shape)}, got {a.shape}")


def _check_planes(h, w, kh, kw, pad, hq, wq, run):
    # Every plane element written (the input) and every run read (the furthest kernel offset) lies inside hq x wq.
    if (h - 1 + pad[0]) // 2 >= hq or (w - 1 + pad[1]) // 2 >= wq or (kh // 2) * wq + kw // 2 + run > hq * wq:
        raise ValueError(f"cpu kernel: {hq}x{wq} planes do not hold a {h}x{w} input padded {pad} and runs of {run}")


def _rows(a, name):
    """Return the row stride (elements) of a 2-d array whose rows are contiguous (a view of a wider array is fine)."""
    if a.ndim != 2 or a.strides[1] != a.itemsize or a.strides[0] % a.itemsize or a.strides[0] < a.shape[1] * a.itemsize:
        raise ValueError(f"cpu kernel: {name} must be 2-d with contiguous rows (unit column stride), got shape "
                         f"{a.shape} and strides {a.strides}")
    return a.strides[0] // a.itemsize


def im2col(x, col, kh, kw, pad, hq, wq, run):
    """Fill rows 0..C*kh*kw-1 of ``col`` (at least K rows of 4*n*run; a column range of a wider matrix is fine) from
    x (C, n, H, W), any strides, as the numpy im2col of ``NumpyOps._conv_pool_part`` does (planes of hq x wq, runs
    of ``run``, columns ordered (a, b, n, t))."""
    _f32(x, col)
    _writable(col)
    c, n, h, w = x.shape
    sc, sn, sh, sw = _strides(x, 4)
    stride = _rows(col, "col")
    if col.shape[0] < c * kh * kw or col.shape[1] != 4 * n * run:
        raise ValueError(f"cpu kernel im2col: col {col.shape} does not hold {c}x{kh}x{kw} rows of {4 * n * run}")
    _check_planes(h, w, kh, kw, pad, hq, wq, run)
    _module().im2col(x.ctypes.data, col.ctypes.data, sc, sn, sh, sw, c, n, h, w, kh, kw, pad[0], pad[1], hq, wq,
                     run, stride)


def max4(y, out, arg, relu):
    """out (F, m) = max of y (F, 4, m) over axis 1 (then ReLU); arg (F, m) uint8 = the first argmax.  out and arg
    may be column ranges of wider arrays."""
    _f32(y, out)
    _writable(out, arg)
    f, _, m = y.shape
    _contiguous(y, (f, 4, m))
    if out.shape != (f, m) or arg.shape != (f, m) or arg.dtype != numpy.uint8:
        raise ValueError(f"cpu kernel max4: out and arg must be ({f}, {m}), arg uint8")
    _module().max4(y.ctypes.data, out.ctypes.data, arg.ctypes.data, f, m, _rows(out, "out"), _rows(arg, "arg"),
                   int(bool(relu)))


def pool_grad(dy, relu_out, arg, dconv, wq):
    """dconv (F, 4, m) from dy (F, n, hh, wh), any strides, the uint8 ``arg`` (F, m) and, unless None, the fused
    ReLU's pooled output relu_out (F, m), m = n*hh*wq (arg and relu_out may be column ranges of wider arrays)."""
    f, n, hh, wh = dy.shape
    m = n * hh * wq
    _f32(dy, dconv)
    _writable(dconv)
    sf, sn, si, sj = _strides(dy, 4)
    _contiguous(dconv, (f, 4, m))
    if arg.shape != (f, m) or arg.dtype != numpy.uint8 or wh > wq:
        raise ValueError(f"cpu kernel pool_grad: arg must be uint8 ({f}, {m}) and wh <= wq")
    pr, sr = 0, 0
    if relu_out is not None:
        _f32(relu_out)
        if relu_out.shape != (f, m):
            raise ValueError(f"cpu kernel pool_grad: relu_out must be ({f}, {m})")
        pr, sr = relu_out.ctypes.data, _rows(relu_out, "relu_out")
    _module().pool_grad(dy.ctypes.data, pr, arg.ctypes.data, dconv.ctypes.data, sf, sn, si, sj, sr,
                        _rows(arg, "arg"), f, n, hh, wh, wq)


def col2im(dcol, dx, kh, kw, pad, hq, wq, run):
    """dx (C, n, H, W), any strides, = the adjoint of ``im2col`` applied to dcol (C*kh*kw rows of 4*n*run; a column
    range of a wider matrix is fine)."""
    _f32(dcol, dx)
    _writable(dx)
    c, n, h, w = dx.shape
    sc, sn, sh, sw = _strides(dx, 4)
    stride = _rows(dcol, "dcol")
    if dcol.shape != (c * kh * kw, 4 * n * run):
        raise ValueError(f"cpu kernel col2im: dcol {dcol.shape} is not ({c * kh * kw}, {4 * n * run})")
    _check_planes(h, w, kh, kw, pad, hq, wq, run)
    _module().col2im(dcol.ctypes.data, dx.ctypes.data, sc, sn, sh, sw, c, n, h, w, kh, kw, pad[0], pad[1], hq, wq,
                     run, stride)
