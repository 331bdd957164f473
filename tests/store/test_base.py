"""Tests of what every store shares (asyncsgd.store.base) that need no MPI traffic: the Adagrad step, and the check
the concurrent store tests apply to a fetch (tests/support/store_checks.py) against deliberately torn reads."""
from __future__ import annotations

import numpy
import pytest

from asyncsgd.backends.sparse import fused_update
from asyncsgd.store.base import adagrad_step
from store_checks import COUNTERS, read_faults

DTYPES = [numpy.float32, numpy.float64]


@pytest.mark.parametrize("dtype", DTYPES)
def test_adagrad_step_uses_sums_including_this_gradient(dtype):
    rng = numpy.random.default_rng(4)
    g = rng.standard_normal(500).astype(dtype)
    old = rng.uniform(0, 3, 500).astype(dtype)
    old_copy, g_copy = old.copy(), g.copy()
    step = adagrad_step(g, old, lr=0.1, eps=1e-6, weight=0.5)
    want = -0.5 * 0.1 * g.astype(numpy.float64) / numpy.sqrt(old.astype(numpy.float64)
                                                             + g.astype(numpy.float64) ** 2 + 1e-6)
    numpy.testing.assert_allclose(step, want, rtol=1e-5 if dtype == numpy.float32 else 1e-12)
    assert numpy.array_equal(old, old_copy) and numpy.array_equal(g, g_copy), "adagrad_step modified an input"
    # the squares a caller already has, and an output buffer, give the same step
    out = numpy.empty_like(g)
    assert adagrad_step(g, old, 0.1, 1e-6, 0.5, squares=g * g, out=out) is out
    assert numpy.array_equal(out, step)
    # the store's step is the local fused update's change of the parameters (no momentum), bit for bit
    p = numpy.zeros(500, dtype)
    fused_update(p, g, lr=0.1, weight=0.5, sum_sq=old.copy(), eps=1e-6)
    assert numpy.array_equal(p, step)


def _counted(initial, pushes, rng):
    """``initial`` after ``pushes`` pushes that add 1 at the counter elements and integers elsewhere."""
    out = initial.copy()
    for _ in range(pushes):
        delta = rng.integers(-3, 4, initial.size).astype(numpy.float32)
        delta[COUNTERS] = 1
        out += delta
    return out


def test_the_read_check_fails_a_read_that_mixes_two_versions():
    """A fetch that returned version 7 must hold all 7 pushes at every counter element.  A read whose first half is
    the older copy (version 6) fails the check, although every value is a whole number: the check the store tests
    made before (``out == round(out)``) passed it."""
    rng = numpy.random.default_rng(5)
    initial = rng.integers(-50, 50, 37).astype(numpy.float32)
    older = _counted(initial, 6, rng)
    newer = older.copy()
    newer += _counted(numpy.zeros(37, numpy.float32), 1, rng)
    assert read_faults(newer, initial, version=7, overlap=0) == []
    assert read_faults(older, initial, version=6, overlap=1) == []   # a push that may not have landed yet
    assert read_faults(newer, initial, version=6, overlap=1) == []   # ... or may have
    torn = newer.copy()
    torn[:18] = older[:18]
    assert numpy.array_equal(torn, numpy.round(torn)), "the old check passes the torn read"
    faults = read_faults(torn, initial, version=7, overlap=0)
    assert len(faults) == 1 and "mixes versions" in faults[0]
    # a push that had not started when the reads ended, and a value no push makes, fail it too
    assert read_faults(newer, initial, version=6, overlap=0)
    half = newer.copy()
    half[3] += 0.5
    assert any("whole numbers" in f for f in read_faults(half, initial, version=7, overlap=0))
