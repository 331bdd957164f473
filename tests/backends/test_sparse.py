"""Tests of the numpy reference of sparse selection, scatter and the fused update (asyncsgd.backends.sparse)."""
import math

import numpy
import pytest

from asyncsgd.backends.sparse import fused_update, scatter_add, select_topk, select_topk_blocks, topk_count

DTYPES = [numpy.float32, numpy.float64]


def _vectors(n, dtype, seed):
    rng = numpy.random.default_rng(seed)
    accrued = rng.standard_normal(n).astype(dtype)
    residual = (0.3 * rng.standard_normal(n)).astype(dtype)
    return accrued, residual


@pytest.mark.parametrize("n,fraction", [(1, 0.5), (7, 0.3), (100, 0.01), (1000, 1.0), (4097, 0.05),
                                        (70_001, 0.01), (300_000, 0.001), (200_000, 0.3)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_topk_chooses_exactly_the_k_largest(n, fraction, dtype):
    accrued, residual = _vectors(n, dtype, seed=n)
    v = accrued + residual                      # the same float rounding select_topk performs
    idx, values = select_topk(accrued, fraction, residual)
    k = max(1, math.ceil(fraction * n))
    assert idx.dtype == numpy.int64 and values.dtype == dtype
    assert idx.shape == (k,) and values.shape == (k,)
    assert numpy.all(numpy.diff(idx) > 0), "indices must be unique and sorted"
    assert numpy.array_equal(values, v[idx])
    unchosen = numpy.ones(n, bool)
    unchosen[idx] = False
    if unchosen.any():
        assert numpy.abs(values).min() >= numpy.abs(v[unchosen]).max()
    # error feedback: nothing lost, nothing changed except the chosen entries
    assert numpy.all(residual[idx] == 0)
    assert numpy.array_equal(residual[unchosen], v[unchosen])
    rebuilt = residual.copy()
    rebuilt[idx] += values
    assert numpy.array_equal(rebuilt, v)


def test_select_topk_breaks_ties_with_exactly_k_entries():
    accrued = numpy.ones(1000, numpy.float32)
    residual = numpy.zeros(1000, numpy.float32)
    idx, values = select_topk(accrued, 0.01, residual)
    assert idx.shape == (10,) and numpy.all(values == 1)
    assert residual.sum() == 990


def test_select_topk_is_exact_whatever_the_sample():
    # A vector with a few huge entries far out and a flat bulk: a sample misses the huge ones entirely.
    n = 200_000
    rng = numpy.random.default_rng(1)
    accrued = rng.uniform(-1, 1, n).astype(numpy.float32)
    big = rng.choice(n, 50, replace=False)
    accrued[big] = 1e6
    for seed in range(3):
        residual = numpy.zeros(n, numpy.float32)
        idx, _ = select_topk(accrued, 0.0002, residual, rng=numpy.random.default_rng(seed))
        assert set(idx.tolist()) <= set(big.tolist())
        assert idx.shape == (40,)


def test_select_topk_accumulates_residual_over_pushes():
    n = 5000
    rng = numpy.random.default_rng(2)
    residual = numpy.zeros(n, numpy.float64)
    pushed = numpy.zeros(n, numpy.float64)
    total = numpy.zeros(n, numpy.float64)
    for _ in range(20):
        g = rng.standard_normal(n)
        total += g
        idx, values = select_topk(g, 0.05, residual)
        scatter_add(pushed, idx, values)
    numpy.testing.assert_allclose(pushed + residual, total, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_topk_count_rejects_bad_fraction(bad):
    with pytest.raises(ValueError, match="fraction"):
        topk_count(10, bad)


def test_select_topk_validates_inputs():
    a = numpy.zeros(10, numpy.float32)
    with pytest.raises(TypeError, match="float64"):
        select_topk(a, 0.1, numpy.zeros(10, numpy.float64))
    with pytest.raises(ValueError, match=r"shape \(10,\)"):
        select_topk(a, 0.1, numpy.zeros(11, numpy.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        select_topk(a, 0.1, numpy.zeros(20, numpy.float32)[::2])
    with pytest.raises(TypeError, match="float32 or float64"):
        select_topk(numpy.zeros(10, numpy.int32), 0.1, numpy.zeros(10, numpy.int32))


def test_scatter_add_adds_in_place_and_sums_repeats():
    dense = numpy.arange(6, dtype=numpy.float32)
    scatter_add(dense, numpy.array([0, 5, 0]), numpy.array([1.0, 2.0, 3.0], numpy.float32))
    assert dense.tolist() == [4.0, 1.0, 2.0, 3.0, 4.0, 7.0]
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        scatter_add(dense, numpy.array([6]), numpy.array([1.0], numpy.float32))
    with pytest.raises(TypeError, match="float32"):
        scatter_add(dense, numpy.array([1]), numpy.array([1.0]))


def _plain_update(p, g, lr, mu, v, w, G, eps, acc):
    """The update written out element by element in float64 (what fused_update must equal up to rounding)."""
    p, g = p.astype(numpy.float64), g.astype(numpy.float64)
    d = g
    if G is not None:
        G = G.astype(numpy.float64) + g * g
        d = g / numpy.sqrt(G + eps)
    if v is not None:
        v = mu * v.astype(numpy.float64) + d
        d = v
    p = p - w * lr * d
    if acc is not None:
        acc = acc.astype(numpy.float64) + d
    return p, v, G, acc


@pytest.mark.parametrize("use_velocity", [False, True])
@pytest.mark.parametrize("use_adagrad", [False, True])
@pytest.mark.parametrize("use_accrued", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_update_matches_the_formula(use_velocity, use_adagrad, use_accrued, dtype):
    n = 1001
    rng = numpy.random.default_rng(3)
    p = rng.standard_normal(n).astype(dtype)
    g = rng.standard_normal(n).astype(dtype)
    v = rng.standard_normal(n).astype(dtype) if use_velocity else None
    G = rng.uniform(0, 2, n).astype(dtype) if use_adagrad else None
    acc = rng.standard_normal(n).astype(dtype) if use_accrued else None
    mu = 0.9 if use_velocity else 0.0
    want = _plain_update(p, g, 0.05, mu, v, 0.7, G, 1e-8, acc)
    fused_update(p, g, lr=0.05, momentum=mu, velocity=v, weight=0.7, sum_sq=G, eps=1e-8, accrued=acc)
    rtol = 1e-5 if dtype == numpy.float32 else 1e-12
    for got, ref in zip((p, v, G, acc), want):
        if got is None:
            assert ref is None
        else:
            numpy.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol)


def test_fused_update_momentum_accumulates_over_steps():
    p = numpy.zeros(3)
    v = numpy.zeros(3)
    g = numpy.array([1.0, -2.0, 0.5])
    for _ in range(3):
        fused_update(p, g, lr=0.1, momentum=0.5, velocity=v)
    # v after steps: g, 1.5g, 1.75g; params moved by lr * (1 + 1.5 + 1.75) g
    numpy.testing.assert_allclose(v, 1.75 * g)
    numpy.testing.assert_allclose(p, -0.1 * 4.25 * g)


def test_fused_update_rejects_momentum_without_velocity():
    with pytest.raises(ValueError, match="velocity"):
        fused_update(numpy.zeros(3), numpy.zeros(3), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        fused_update(numpy.zeros(3), numpy.zeros(4), lr=0.1)


class _MisleadingSample:
    """An rng whose 'random' sample is always the largest entry: the threshold overshoots and too few candidates
    pass it, which select_topk must detect and recover from with a full partition."""

    def __init__(self, index):
        self.index = index

    def integers(self, low, high, size):
        return numpy.full(size, self.index)


def test_select_topk_recovers_from_a_sample_that_overshoots():
    n = 100_000
    rng = numpy.random.default_rng(6)
    accrued = rng.standard_normal(n).astype(numpy.float32)
    want = numpy.sort(numpy.argsort(numpy.abs(accrued))[-1000:])
    residual = numpy.zeros(n, numpy.float32)
    idx, values = select_topk(accrued, 0.01, residual, rng=_MisleadingSample(int(numpy.argmax(numpy.abs(accrued)))))
    assert numpy.array_equal(idx, want)
    assert numpy.array_equal(values, accrued[want])


@pytest.mark.parametrize("n,fraction,block", [(1000, 0.01, 8), (1003, 0.05, 16), (70_001, 0.01, 32),
                                              (100, 0.5, 7), (10, 0.01, 64), (300_000, 0.001, 4)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_topk_blocks_chooses_whole_blocks_of_largest_norm(n, fraction, block, dtype):
    accrued, residual = _vectors(n, dtype, seed=n + block)
    v = accrued + residual
    idx, values = select_topk_blocks(accrued, fraction, residual, block)
    n_blocks = -(-n // block)
    kb = min(n_blocks, -(-max(1, math.ceil(fraction * n)) // block))
    chosen = numpy.unique(idx // block)
    assert idx.dtype == numpy.int64 and values.dtype == dtype
    assert numpy.all(numpy.diff(idx) > 0), "indices must be unique and sorted"
    assert chosen.size == kb
    whole = numpy.concatenate([numpy.arange(b * block, min(n, (b + 1) * block)) for b in chosen])
    assert numpy.array_equal(idx, whole), "every chosen block is pushed whole, the short last one included"
    scores = numpy.array([numpy.dot(v[b * block:(b + 1) * block], v[b * block:(b + 1) * block])
                          for b in range(n_blocks)])
    others = numpy.setdiff1d(numpy.arange(n_blocks), chosen)
    if others.size:
        assert scores[chosen].min() >= scores[others].max() * (1 - 1e-5)
    assert numpy.array_equal(values, v[idx])
    rebuilt = residual.copy()
    rebuilt[idx] += values
    assert numpy.array_equal(rebuilt, v), "error feedback: residual + pushed == accrued + old residual, bit for bit"


def test_select_topk_blocks_of_one_is_select_topk_and_rejects_bad_blocks():
    accrued, residual = _vectors(5000, numpy.float32, seed=9)
    r1, r2 = residual.copy(), residual.copy()
    i1, v1 = select_topk(accrued, 0.02, r1)
    i2, v2 = select_topk_blocks(accrued, 0.02, r2, 1)
    assert numpy.array_equal(i1, i2) and numpy.array_equal(v1, v2) and numpy.array_equal(r1, r2)
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match="block must be an int >= 1"):
            select_topk_blocks(accrued, 0.02, residual, bad)


def test_select_topk_blocks_accumulates_residual_over_pushes():
    n = 5000
    rng = numpy.random.default_rng(4)
    residual = numpy.zeros(n, numpy.float64)
    pushed = numpy.zeros(n, numpy.float64)
    total = numpy.zeros(n, numpy.float64)
    for _ in range(20):
        g = rng.standard_normal(n)
        total += g
        idx, values = select_topk_blocks(g, 0.05, residual, 16)
        scatter_add(pushed, idx, values)
    numpy.testing.assert_allclose(pushed + residual, total, rtol=1e-12, atol=1e-12)
