"""Sharded L-BFGS: the strong-Wolfe line search, the serial reference, and sharded == serial on logistic regression."""
import numpy
import pytest

from asyncsgd.algorithms.sandblaster.lbfgs import ShardedEvaluator, ShardedLBFGS, shard_bounds
from asyncsgd.algorithms.sandblaster.linesearch import C1, C2, strong_wolfe
from lbfgs_reference import lbfgs_serial


def _logreg_data(n=400, dim=12, k=4, seed=0):
    rng = numpy.random.default_rng(seed)
    x = rng.normal(size=(n, dim))
    w = rng.normal(size=(dim, k))
    y = numpy.argmax(x @ w + rng.normal(size=(n, k)), axis=1)
    return x, y, k


def _logreg_sums(w, x, y, k):
    """Summed softmax cross-entropy and its gradient of a linear model (weights dim x k, then k biases)."""
    dim = x.shape[1]
    z = x @ w[:dim * k].reshape(dim, k) + w[dim * k:]
    z -= z.max(axis=1, keepdims=True)
    p = numpy.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    rows = numpy.arange(len(y))
    loss = -numpy.log(p[rows, y]).sum()
    p[rows, y] -= 1.0
    return loss, numpy.concatenate([(x.T @ p).ravel(), p.sum(axis=0)]), len(y)


@pytest.mark.parametrize("func", ["quadratic", "quartic", "sine"])
def test_line_search_satisfies_strong_wolfe(func):
    fs = {"quadratic": (lambda a: (a - 3.0) ** 2, lambda a: 2 * (a - 3.0)),
          "quartic": (lambda a: (a - 0.01) ** 4 - 0.1 * a, lambda a: 4 * (a - 0.01) ** 3 - 0.1),
          "sine": (lambda a: numpy.sin(3 * a) + 0.1 * a * a, lambda a: 3 * numpy.cos(3 * a) + 0.2 * a)}
    f, g = fs[func]
    f0, g0 = f(0.0), g(0.0)
    if g0 >= 0:  # make it a descent direction
        f, g, f0, g0 = (lambda a, f=f: f(-a)), (lambda a, g=g: -g(-a)), f0, -g0
    res = strong_wolfe(lambda a: (f(a), g(a)), f0, g0, alpha0=1.0)
    assert res.wolfe and res.alpha > 0
    assert res.f <= f0 + C1 * res.alpha * g0
    assert abs(res.dphi) <= -C2 * g0
    assert res.f == pytest.approx(f(res.alpha)) and res.dphi == pytest.approx(g(res.alpha))


def test_line_search_rejects_ascent():
    with pytest.raises(ValueError, match="descent"):
        strong_wolfe(lambda a: (a, 1.0), 0.0, 1.0)


def test_serial_lbfgs_solves_a_quadratic():
    rng = numpy.random.default_rng(1)
    q = rng.normal(size=(30, 30))
    a = q @ q.T + 30 * numpy.eye(30)
    b = rng.normal(size=30)
    res = lbfgs_serial(lambda x: (0.5 * x @ a @ x - b @ x, a @ x - b), numpy.zeros(30), history=5,
                       max_iter=200, grad_tol=1e-6, loss_tol=0.0)
    assert res.reason == "grad_tol"
    numpy.testing.assert_allclose(res.x, numpy.linalg.solve(a, b), atol=1e-6)
    assert res.losses == sorted(res.losses, reverse=True)  # monotone decrease


def test_history_must_be_positive(comm):
    with pytest.raises(ValueError, match="history"):
        lbfgs_serial(lambda x: (x @ x, 2 * x), numpy.ones(3), history=0, max_iter=5)
    ev = ShardedEvaluator(comm, 3, lambda x: (0.0, numpy.zeros(3), 1))
    with pytest.raises(ValueError, match="history"):
        ShardedLBFGS(ev, numpy.zeros(ev.hi - ev.lo), history=0)


def test_shard_bounds_cover_everything():
    for n, p in [(10, 3), (2, 6), (0, 2), (7, 7)]:
        b = shard_bounds(n, p)
        assert b[0][0] == 0 and b[-1][1] == n and len(b) == p
        assert all(hi - lo in (n // p, n // p + 1) for lo, hi in b)
        assert all(b[i][1] == b[i + 1][0] for i in range(p - 1))


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("history", [1, 5])
def test_sharded_matches_serial_on_logistic_regression(comm, history):
    x, y, k = _logreg_data()
    n = x.shape[1] * k + k
    l2 = 1e-3

    def f_and_g(w):
        loss, g, m = _logreg_sums(w, x, y, k)
        return loss / m + 0.5 * l2 * w @ w, g / m + l2 * w

    ref = lbfgs_serial(f_and_g, numpy.zeros(n), history, 300, grad_tol=1e-7, loss_tol=0.0)
    # Each rank sums the loss over its own rows; the shards of the vectors are spread over all ranks.
    lo, hi = shard_bounds(len(y), comm.size)[comm.rank]
    ev = ShardedEvaluator(comm, n, lambda w: _logreg_sums(w, x[lo:hi], y[lo:hi], k), l2=l2)
    opt = ShardedLBFGS(ev, numpy.zeros(ev.hi - ev.lo), history)
    reason = opt.minimize(300, grad_tol=1e-7, loss_tol=0.0)
    assert reason == ref.reason == "grad_tol"
    assert abs(opt.f - ref.f) / abs(ref.f) < 1e-6
    assert abs(opt.iterations - ref.iterations) <= max(1, 0.1 * ref.iterations)
    numpy.testing.assert_allclose(opt.x, ref.x[ev.lo:ev.hi], atol=1e-5)
    assert opt.gnorm <= 1e-7
