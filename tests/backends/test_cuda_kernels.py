"""The CUDA kernels and their wrappers against the numpy reference, on fresh random inputs of several shapes.

Every kernel test runs twice through the ``cp`` fixture: on a GPU with CuPy (marked ``gpu``: skipped without one,
FAILS instead when ASYNCSGD_REQUIRE_GPU=1, see tests/conftest.py), and on the CPU with the unchanged wrappers and
kernels under tests/support/cuda_emulator.py (g++; one fiber per CUDA thread, real barriers and warp shuffles, strict
checks of every kernel argument's C type), at sizes the emulation can afford.  Outputs are poisoned with NaN before
a kernel runs, so an element it fails to write fails the comparison.  float32 results must match to a relative
error below 1e-5 (max |gpu - ref| <= 1e-5 * max |ref|); kernels without a GEMM are built to match bit for bit and
are compared exactly.

The first tests drive the selection's host-side search (``find_threshold``) with a numpy counter and replay the
compaction's slot formula against ``asyncsgd.backends.sparse.select_topk``.
"""
import math

import numpy
import pytest

import cuda_emulator
from asyncsgd.backends import device as backend_device
from asyncsgd.backends import sparse as ref
from asyncsgd.backends import cuda_kernels as kernels
from asyncsgd.backends.cuda_sparse import KEY_END, find_threshold, magnitude_keys
from asyncsgd.backends.numpy_ops import NumpyOps

DTYPES = [numpy.float32, numpy.float64]


# ------------------------------------------------------------------ CPU: the selection's host logic

def _numpy_counter(keys, calls):
    def count_at_least(probes):
        calls.append(list(probes))
        assert probes == sorted(set(probes)), "probes must ascend strictly"
        return [int(numpy.count_nonzero(keys >= p)) for p in probes]
    return count_at_least


def _emulate_select(v, fraction, tolerance, seed=0):
    """The GPU select_topk's algorithm in numpy: sample, find_threshold, then the compact kernel's slot formula."""
    n = v.shape[0]
    k = ref.topk_count(n, fraction)
    keys = magnitude_keys(v).astype(numpy.uint64)
    sample = numpy.sort(keys[numpy.random.default_rng(seed).integers(0, n, min(n, 4096))])
    calls = []
    t_lo, t_hi, allowed, total = find_threshold(_numpy_counter(keys, calls), sample, n, k,
                                                int(math.floor(tolerance * k)), KEY_END[v.dtype])
    above = keys >= t_hi
    band = (keys >= t_lo) & ~above
    above_before = numpy.cumsum(above) - above
    band_before = numpy.cumsum(band) - band
    chosen = above | (band & (band_before < allowed))
    slot = above_before + numpy.minimum(band_before, allowed)
    idx = numpy.flatnonzero(chosen)
    assert numpy.array_equal(slot[chosen], numpy.arange(total)), "slots must fill 0..total-1 in index order"
    return idx, k, total, len(calls)


@pytest.mark.parametrize("n,fraction", [(1, 0.5), (2, 0.5), (7, 0.3), (2049, 0.01), (100_003, 0.01),
                                        (300_000, 0.001), (50_000, 0.5)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_search_chooses_the_k_largest(n, fraction, dtype):
    rng = numpy.random.default_rng(n)
    v = (rng.standard_normal(n) * numpy.exp(rng.uniform(-5, 5, n))).astype(dtype)
    idx, k, total, passes = _emulate_select(v, fraction, tolerance=0.0)
    assert total == k and idx.shape == (k,)
    want = ref._largest_k(numpy.abs(v), k, None)
    assert numpy.array_equal(numpy.sort(numpy.abs(v[idx])), numpy.sort(numpy.abs(v[want])))
    assert passes <= (8 if dtype == numpy.float32 else 16) + 1


@pytest.mark.parametrize("tolerance", [0.05, 0.5])
def test_threshold_search_with_tolerance_takes_everything_above(tolerance):
    rng = numpy.random.default_rng(5)
    v = rng.standard_normal(200_000).astype(numpy.float32)
    idx, k, total, passes = _emulate_select(v, 0.01, tolerance)
    assert k <= total <= k + math.floor(tolerance * k) and idx.shape == (total,)
    rest = numpy.ones(v.shape, bool)
    rest[idx] = False
    assert numpy.abs(v[idx]).min() >= numpy.abs(v[rest]).max()
    assert passes <= 3, "a sample-guided first pass should nearly finish the search"


def test_threshold_search_breaks_ties_in_index_order():
    v = numpy.ones(10_000, numpy.float32)
    v[[3, 500, 9000]] = -2.0                               # three clear winners, then ties of magnitude 1
    v[::7] *= -1
    idx, k, total, _ = _emulate_select(v, 0.001, 0.0)      # k = 10
    assert total == k == 10
    assert idx.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 500, 9000]     # the winners, then ties by index


def test_threshold_search_handles_zeros_nan_and_inf():
    v = numpy.zeros(5000, numpy.float64)
    v[10], v[20], v[30] = numpy.nan, -numpy.inf, 1e-300
    idx, k, total, _ = _emulate_select(v, 0.0006, 0.0)     # k = 3: NaN, inf and the tiny number
    assert idx.tolist() == [10, 20, 30]
    idx, _, total, _ = _emulate_select(v, 0.001, 0.0)      # k = 5: two zeros join, the first ones by index
    assert idx.tolist() == [0, 1, 10, 20, 30]


def test_find_threshold_rejects_bad_k():
    with pytest.raises(ValueError, match="k must lie"):
        find_threshold(lambda p: [], [], 10, 0, 0, 1 << 31)


# ------------------------------------------------------------------ GPU fixtures and helpers

@pytest.fixture(params=[pytest.param("cupy", marks=pytest.mark.gpu), pytest.param("emulated", marks=pytest.mark.slow)])
def cp(request, monkeypatch):
    """The array module the GPU code runs on: CuPy on a GPU, or the CPU emulation of tests/cuda_emulator.py."""
    if request.param == "cupy":
        import cupy
        return cupy
    if cuda_emulator.compiler() is None:
        pytest.skip("the CPU emulation of the kernels needs g++")
    fake = cuda_emulator.fake_cupy()
    monkeypatch.setattr(backend_device, "import_cupy", lambda: fake)
    kernels.module.cache_clear()                       # compiled modules belong to one array module
    request.addfinalizer(kernels.module.cache_clear)
    return fake


def _limit(cp, n, emulated_max):
    """Skip sizes above ``emulated_max`` under the CPU emulation (one OS thread per CUDA thread is slow)."""
    if getattr(cp, "emulated", False) and n > emulated_max:
        pytest.skip(f"n={n} is too large for the CPU emulation (runs on a GPU)")


def _assert_close(got, want, rtol):
    """max |got - want| <= rtol * max |want| (normwise), with NaN anywhere in got failing."""
    got = numpy.asarray(got, dtype=numpy.float64)
    want = numpy.asarray(want, dtype=numpy.float64)
    assert got.shape == want.shape
    assert not numpy.isnan(got).any(), "output holds NaN: an element was not written"
    scale = max(float(numpy.abs(want).max(initial=0.0)), 1e-30)
    err = float(numpy.abs(got - want).max(initial=0.0))
    assert err <= rtol * scale, f"max abs error {err:.3g} > {rtol:g} * {scale:.3g}"


def _rtol(dtype):
    return 1e-5 if dtype == numpy.float32 else 1e-12


def _poisoned_ws(cp, **shapes):
    """Return a workspace dict whose named buffers are pre-filled with NaN (uint8 ones with 255)."""
    ws = {}
    for key, (shape, dtype) in shapes.items():
        ws[key] = cp.full(shape, 255 if numpy.dtype(dtype) == numpy.uint8 else numpy.nan, dtype=dtype)
    return ws


# ------------------------------------------------------------------ GPU: convolution

# (C, N, H, W, F, k, stride, pad): the layers of speech_cnn and mnist_cnn, then odd sizes, strides and paddings.
CONV_SHAPES = [
    (1, 4, 40, 64, 16, 5, 1, 2), (16, 4, 20, 32, 32, 3, 1, 1),
    (1, 3, 28, 28, 16, 5, 1, 2), (16, 3, 14, 14, 32, 5, 1, 2),
    (3, 5, 9, 7, 4, 3, 2, 1), (2, 1, 11, 13, 3, 4, 3, 0), (5, 2, 6, 5, 7, 1, 1, 0), (1, 1, 5, 5, 1, 5, 1, 2),
]
# Rectangular kernels, strides and paddings: (C, N, H, W, F, (kh, kw), (sh, sw), (ph, pw)).
RECT_CONV_SHAPES = [(1, 3, 13, 20, 4, (5, 3), (1, 2), (2, 1)), (2, 2, 9, 8, 3, (1, 4), (2, 1), (0, 2)),
                    (3, 1, 12, 7, 2, (3, 1), (3, 1), (1, 0))]


@pytest.mark.parametrize("shape", CONV_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_im2col_and_col2im_add_match_numpy_exactly(cp, shape, dtype):
    from asyncsgd.backends.cupy_ops import CupyOps
    c, n, h, w, _, k, s, p = shape
    rng = numpy.random.default_rng(sum(shape))
    xpad = rng.standard_normal((c, n, h + 2 * p, w + 2 * p)).astype(dtype)
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    want = numpy.empty((c, k, k, n, ho, wo), dtype)
    NumpyOps().im2col(xpad, k, k, s, ho, wo, out=want)
    got = cp.full(want.shape, numpy.nan, dtype=dtype)
    CupyOps().im2col(cp.asarray(xpad), k, k, s, ho, wo, out=got)
    assert numpy.array_equal(got.get(), want)

    dcol = rng.standard_normal(want.shape).astype(dtype)
    base = rng.standard_normal(xpad.shape).astype(dtype)
    want_dx = base.copy()
    NumpyOps().col2im_add(dcol, s, want_dx)
    got_dx = cp.asarray(base)
    CupyOps().col2im_add(cp.asarray(dcol), s, got_dx)
    assert numpy.array_equal(got_dx.get(), want_dx)


@pytest.mark.parametrize("shape", CONV_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_forward_backward_match_numpy(cp, shape, dtype):
    from asyncsgd.backends.cupy_ops import CupyOps
    c, n, h, w, f, k, s, p = shape
    rng = numpy.random.default_rng(sum(shape) + 1)
    x = rng.standard_normal((c, n, h, w)).astype(dtype)
    wt = rng.standard_normal((f, c, k, k)).astype(dtype)
    b = rng.standard_normal(f).astype(dtype)
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    dy = rng.standard_normal((f, n, ho, wo)).astype(dtype)
    y_ref, cache_ref = NumpyOps().conv2d_forward(x, wt, b, s, p)
    dw_ref, db_ref = numpy.empty_like(wt), numpy.empty_like(b)
    dx_ref = NumpyOps().conv2d_backward(dy, cache_ref, wt, dw_ref, db_ref)

    ops = CupyOps()
    ws = _poisoned_ws(cp, y=((f, n * ho * wo), dtype), dx=((c, n, h, w), dtype), dcol=((c * k * k, n * ho * wo), dtype))
    y, cache = ops.conv2d_forward(cp.asarray(x), cp.asarray(wt), cp.asarray(b), s, p, ws=ws)
    _assert_close(y.get(), y_ref, _rtol(dtype))
    dw, db = cp.full(wt.shape, numpy.nan, dtype), cp.full(b.shape, numpy.nan, dtype)
    dx = ops.conv2d_backward(cp.asarray(dy), cache, cp.asarray(wt), dw, db, ws=ws)
    _assert_close(dw.get(), dw_ref, _rtol(dtype))
    _assert_close(db.get(), db_ref, _rtol(dtype))
    _assert_close(dx.get(), dx_ref, _rtol(dtype))
    # the caches are interchangeable: NumpyOps' backward (on cupy arrays) accepts CupyOps' cache
    dx_mixed = NumpyOps.conv2d_backward(ops, cp.asarray(dy), cache, cp.asarray(wt), dw, db)
    _assert_close(dx_mixed.get(), dx_ref, _rtol(dtype))


@pytest.mark.parametrize("shape", RECT_CONV_SHAPES)
def test_rectangular_conv2d_matches_numpy(cp, shape):
    from asyncsgd.backends.cupy_ops import CupyOps
    c, n, h, w, f, (kh, kw), stride, pad = shape
    rng = numpy.random.default_rng(h * w)
    x = rng.standard_normal((c, n, h, w))
    wt = rng.standard_normal((f, c, kh, kw))
    b = rng.standard_normal(f)
    y_ref, cache_ref = NumpyOps().conv2d_forward(x, wt, b, stride, pad)
    dy = rng.standard_normal(y_ref.shape)
    dw_ref, db_ref = numpy.empty_like(wt), numpy.empty_like(b)
    dx_ref = NumpyOps().conv2d_backward(dy, cache_ref, wt, dw_ref, db_ref)
    ops = CupyOps()
    y, cache = ops.conv2d_forward(cp.asarray(x), cp.asarray(wt), cp.asarray(b), stride, pad)
    _assert_close(y.get(), y_ref, 1e-12)
    dw, db = cp.full(wt.shape, numpy.nan), cp.full(b.shape, numpy.nan)
    dx = ops.conv2d_backward(cp.asarray(dy), cache, cp.asarray(wt), dw, db)
    for got, want in ((dw, dw_ref), (db, db_ref), (dx, dx_ref)):
        _assert_close(got.get(), want, 1e-12)


def test_conv2d_wrappers_reject_bad_input(cp):
    from asyncsgd.backends.cupy_ops import CupyOps
    ops = CupyOps()
    x = cp.zeros((2, 1, 8, 8), cp.float32)
    with pytest.raises(TypeError, match="cupy.ndarray"):
        ops.conv2d_forward(numpy.zeros((2, 1, 8, 8), numpy.float32), cp.zeros((3, 2, 3, 3), cp.float32),
                           cp.zeros(3, cp.float32), 1, 0)
    with pytest.raises(TypeError, match="float32"):
        ops.conv2d_forward(x, cp.zeros((3, 2, 3, 3), cp.float64), cp.zeros(3, cp.float32), 1, 0)
    with pytest.raises(ValueError, match="channels"):
        ops.conv2d_forward(x, cp.zeros((3, 4, 3, 3), cp.float32), cp.zeros(3, cp.float32), 1, 0)
    with pytest.raises(ValueError, match="out must have shape"):
        ops.im2col(x, 3, 3, 1, 6, 6, out=cp.zeros((2, 3, 3, 1, 6, 5), cp.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        ops.im2col(cp.zeros((2, 1, 8, 16), cp.float32)[..., ::2], 3, 3, 1, 6, 6,
                   out=cp.zeros((2, 3, 3, 1, 6, 6), cp.float32))


# ------------------------------------------------------------------ GPU: max pooling

# (C, N, H, W, size, stride): the networks' 2x2 pools, overlapping windows, uncovered edges, a 1x1 window, then
# rectangular windows and strides (pooling over frequency only, overlapping in one axis, gaps in the other).
POOL_SHAPES = [(16, 4, 40, 64, 2, 2), (32, 3, 14, 14, 2, 2), (3, 2, 9, 11, 3, 2), (2, 3, 7, 5, 2, 2),
               (1, 1, 10, 10, 3, 1), (4, 2, 5, 6, 1, 1), (2, 2, 16, 16, 4, 3),
               (3, 2, 40, 12, (2, 1), (2, 1)), (2, 2, 9, 13, (3, 2), (1, 3)), (2, 1, 8, 7, (1, 4), (2, 2))]


@pytest.mark.parametrize("shape", POOL_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_maxpool_matches_numpy_exactly_including_ties(cp, shape, dtype):
    from asyncsgd.backends.cupy_ops import CupyOps
    c, n, h, w, size, stride = shape
    rng = numpy.random.default_rng(sum(shape[:4]))
    x = rng.integers(-3, 4, (c, n, h, w)).astype(dtype)      # few distinct values: many ties in every window
    y_ref, cache_ref = NumpyOps().maxpool_forward(x, size, stride)
    dy = rng.standard_normal(y_ref.shape).astype(dtype)
    dx_ref = NumpyOps().maxpool_backward(dy, cache_ref)

    ops = CupyOps()
    ws = _poisoned_ws(cp, y=(y_ref.shape, dtype), arg=(y_ref.shape, numpy.uint8), dx=(x.shape, dtype))
    y, cache = ops.maxpool_forward(cp.asarray(x), size, stride, ws=ws)
    assert numpy.array_equal(y.get(), y_ref)
    assert numpy.array_equal(cache[3].get(), cache_ref[3]), "argmax window offsets differ"
    dx = ops.maxpool_backward(cp.asarray(dy), cache, ws=ws)
    assert numpy.array_equal(dx.get(), dx_ref)


@pytest.mark.parametrize("shape", POOL_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_avgpool_matches_numpy_exactly(cp, shape, dtype):
    from asyncsgd.backends.cupy_ops import CupyOps
    c, n, h, w, size, stride = shape
    rng = numpy.random.default_rng(sum(shape[:4]) + 7)
    x = rng.standard_normal((c, n, h, w)).astype(dtype)
    y_ref, cache_ref = NumpyOps().avgpool_forward(x, size, stride)
    dy = rng.standard_normal(y_ref.shape).astype(dtype)
    dx_ref = NumpyOps().avgpool_backward(dy, cache_ref)

    ops = CupyOps()
    ws = _poisoned_ws(cp, y=(y_ref.shape, dtype), dx=(x.shape, dtype))
    y, cache = ops.avgpool_forward(cp.asarray(x), size, stride, ws=ws)
    assert numpy.array_equal(y.get(), y_ref)
    dx = ops.avgpool_backward(cp.asarray(dy), cache, ws=ws)
    assert numpy.array_equal(dx.get(), dx_ref)


def test_maxpool_propagates_nan_like_numpy(cp):
    from asyncsgd.backends.cupy_ops import CupyOps
    x = numpy.arange(32, dtype=numpy.float32).reshape(1, 2, 4, 4)
    x[0, 0, 1, 0] = numpy.nan
    y_ref, cache_ref = NumpyOps().maxpool_forward(x, 2, 2)
    y, cache = CupyOps().maxpool_forward(cp.asarray(x), 2, 2)
    numpy.testing.assert_array_equal(y.get(), y_ref)          # NaN positions equal too
    assert numpy.array_equal(cache[3].get(), cache_ref[3])


# ------------------------------------------------------------------ GPU: whole networks

@pytest.mark.parametrize("name", ["speech_cnn", "mnist_cnn"])
def test_network_gradient_on_gpu_matches_numpy(cp, name):
    # float64, so that no near-tie in a max-pool window or ReLU can flip between backends: the comparison then
    # checks the plumbing of every layer exactly; float32 accuracy is what the per-kernel tests above check.
    from asyncsgd.model import build_model
    cpu = build_model(name, seed=3, dtype=numpy.float64)
    dev = build_model(name, seed=3, xp=cp, dtype=numpy.float64)
    assert type(dev.ops).__name__ == "CupyOps"
    rng = numpy.random.default_rng(0)
    x = rng.standard_normal((8,) + cpu.input_shape)
    y = rng.integers(0, 10, 8)
    loss_cpu = cpu.loss_and_grad(x, y, rng=numpy.random.default_rng(1))
    dev.grads.fill(numpy.nan)
    loss_gpu = dev.loss_and_grad(cp.asarray(x), cp.asarray(y), rng=numpy.random.default_rng(1))
    assert abs(loss_gpu - loss_cpu) <= 1e-10 * abs(loss_cpu)
    _assert_close(dev.grads.get(), cpu.grads, 1e-10)


def test_network_of_the_new_layers_on_gpu_matches_numpy(cp):
    """Rectangular conv/pool, average pooling, tanh and sigmoid: the whole gradient through CupyOps equals numpy's."""
    from asyncsgd.backends.cupy_ops import CupyOps
    from asyncsgd.model import (AvgPool2D, Conv2D, Dense, Flatten, MaxPool2D, Network, NumpyOps, ReLU, Sigmoid,
                                Tanh)

    def make(ops):
        layers = [Conv2D(4, (5, 3), stride=(1, 2), pad=(2, 1)), MaxPool2D((2, 1)), Tanh(),
                  Conv2D(6, 3, pad=1), AvgPool2D((2, 2), (2, 1)), Sigmoid(), Flatten(), Dense(8), ReLU(), Dense(5)]
        return Network("rect", layers, (1, 16, 12), 5, ops=ops, dtype=numpy.float64, seed=2)

    cpu, dev = make(NumpyOps()), make(CupyOps())
    rng = numpy.random.default_rng(4)
    x, y = rng.standard_normal((6, 1, 16, 12)), rng.integers(0, 5, 6)
    loss_cpu = cpu.loss_and_grad(x, y)
    dev.grads.fill(numpy.nan)
    loss_gpu = dev.loss_and_grad(cp.asarray(x), cp.asarray(y))
    assert abs(loss_gpu - loss_cpu) <= 1e-12 * abs(loss_cpu)
    _assert_close(dev.grads.get(), cpu.grads, 1e-10)


# ------------------------------------------------------------------ GPU: sparse selection, scatter, fused update

SELECT_CASES = [(1, 0.5), (7, 0.3), (2047, 0.01), (2048, 0.01), (2049, 0.1), (40_961, 0.01), (100_003, 0.01),
                ((1 << 20) + 1, 0.001), (300_000, 0.5)]


@pytest.mark.parametrize("n,fraction", SELECT_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_topk_matches_numpy(cp, n, fraction, dtype):
    from asyncsgd.backends import cuda_sparse as gsparse
    _limit(cp, n, 50_000)
    rng = numpy.random.default_rng(n)
    accrued = (rng.standard_normal(n) * numpy.exp(rng.uniform(-4, 4, n))).astype(dtype)
    residual = rng.standard_normal(n).astype(dtype)
    v = accrued + residual
    res_ref = residual.copy()
    idx_ref, val_ref = ref.select_topk(accrued, fraction, res_ref)
    res_gpu = cp.asarray(residual)
    idx, values = gsparse.select_topk(cp.asarray(accrued), fraction, res_gpu)
    idx, values, res_gpu = idx.get(), values.get(), res_gpu.get()
    k = idx_ref.shape[0]
    assert idx.dtype == numpy.int64 and values.dtype == dtype and idx.shape == (k,)
    assert numpy.all(numpy.diff(idx) > 0), "indices must be unique and ascending (every slot written)"
    assert numpy.array_equal(values, v[idx])
    assert numpy.array_equal(numpy.sort(numpy.abs(values)), numpy.sort(numpy.abs(val_ref)))
    rebuilt = res_gpu.copy()
    rebuilt[idx] += values
    assert numpy.array_equal(rebuilt, v) and numpy.all(res_gpu[idx] == 0)
    if numpy.unique(numpy.abs(v)).shape[0] == n:           # no ties anywhere: the very same entries
        assert numpy.array_equal(idx, idx_ref) and numpy.array_equal(res_gpu, res_ref)


@pytest.mark.parametrize("tolerance", [0.02, 0.3])
def test_select_topk_with_tolerance(cp, tolerance):
    from asyncsgd.backends import cuda_sparse as gsparse
    n = 40_961 if getattr(cp, "emulated", False) else 1_000_003
    rng = numpy.random.default_rng(7)
    accrued = rng.standard_normal(n).astype(numpy.float32)
    residual = cp.zeros(n, cp.float32)
    idx, values = gsparse.select_topk(cp.asarray(accrued), 0.01, residual, tolerance=tolerance)
    idx, values, res = idx.get(), values.get(), residual.get()
    k = ref.topk_count(n, 0.01)
    assert k <= idx.shape[0] <= k + math.floor(tolerance * k)
    assert numpy.all(numpy.diff(idx) > 0) and numpy.array_equal(values, accrued[idx])
    assert numpy.abs(values).min() >= numpy.abs(res).max()
    res[idx] += values
    assert numpy.array_equal(res, accrued)


def test_select_topk_ties_and_nan(cp):
    from asyncsgd.backends import cuda_sparse as gsparse
    v = numpy.ones(10_001, numpy.float32)
    v[5000] = numpy.nan
    residual = cp.zeros_like(cp.asarray(v))
    idx, values = gsparse.select_topk(cp.asarray(v), 0.001, residual)    # k = 11: the NaN and the first 10 ones
    assert idx.get().tolist() == list(range(10)) + [5000]
    assert int(cp.count_nonzero(residual)) == 10_001 - 11


def test_select_topk_rejects_bad_input(cp):
    from asyncsgd.backends import cuda_sparse as gsparse
    a = cp.zeros(10, cp.float32)
    with pytest.raises(TypeError, match="cupy.ndarray"):
        gsparse.select_topk(numpy.zeros(10, numpy.float32), 0.1, a)
    with pytest.raises(TypeError, match="float64"):
        gsparse.select_topk(a, 0.1, cp.zeros(10, cp.float64))
    with pytest.raises(ValueError, match=r"shape \(10,\)"):
        gsparse.select_topk(a, 0.1, cp.zeros(11, cp.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        gsparse.select_topk(cp.zeros(20, cp.float32)[::2], 0.1, a)
    with pytest.raises(ValueError, match="fraction"):
        gsparse.select_topk(a, 0.0, a.copy())


@pytest.mark.parametrize("n,m", [(1, 1), (1000, 37), (100_003, 5000)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_add_matches_numpy(cp, n, m, dtype):
    from asyncsgd.backends import cuda_sparse as gsparse
    rng = numpy.random.default_rng(n + m)
    dense = rng.standard_normal(n).astype(dtype)
    idx = rng.integers(0, n, m).astype(numpy.int64)                     # repeats included
    values = rng.standard_normal(m).astype(dtype)
    want = dense.copy()
    ref.scatter_add(want, idx, values)
    got = cp.asarray(dense)
    gsparse.scatter_add(got, cp.asarray(idx), cp.asarray(values))
    _assert_close(got.get(), want, _rtol(dtype))
    with pytest.raises(ValueError, match=rf"\[0, {n}\)"):
        gsparse.scatter_add(got, cp.asarray(numpy.array([n], numpy.int64)), cp.asarray(values[:1]))


@pytest.mark.parametrize("n", [1, 1001, (1 << 20) + 3])
@pytest.mark.parametrize("options", ["sgd", "momentum", "adagrad", "adagrad+momentum+accrue", "accrue"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_update_matches_numpy(cp, n, options, dtype):
    from asyncsgd.backends import cuda_sparse as gsparse
    rng = numpy.random.default_rng(n)
    arrays = {"params": rng.standard_normal(n), "grad": rng.standard_normal(n)}
    if "momentum" in options:
        arrays["velocity"] = rng.standard_normal(n)
    if "adagrad" in options:
        arrays["sum_sq"] = rng.uniform(0, 2, n)
    if "accrue" in options:
        arrays["accrued"] = rng.standard_normal(n)
    arrays = {key: a.astype(dtype) for key, a in arrays.items()}
    kwargs = dict(lr=0.05, weight=0.7, eps=1e-8, momentum=0.9 if "momentum" in options else 0.0)
    optional = [key for key in arrays if key not in ("params", "grad")]
    want = {key: a.copy() for key, a in arrays.items()}
    ref.fused_update(want["params"], want["grad"], **kwargs, **{key: want[key] for key in optional})
    dev = {key: cp.asarray(a) for key, a in arrays.items()}
    gsparse.fused_update(dev["params"], dev["grad"], **kwargs, **{key: dev[key] for key in optional})
    for key in arrays:
        _assert_close(dev[key].get(), want[key], _rtol(dtype))
    assert not numpy.array_equal(dev["params"].get(), arrays["params"]), "params must move"
