"""The textbook two-loop L-BFGS on one process: the reference the sharded optimizer is tested against."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy

from asyncsgd.algorithms.sandblaster.linesearch import (C1, C2, CURVATURE_EPS, initial_step, relative_decrease,
                    strong_wolfe)

__all__ = ["lbfgs_serial", "LBFGSResult"]


@dataclass
class LBFGSResult:
    """What an L-BFGS run ended with; ``reason`` is 'grad_tol', 'loss_tol', 'max_iter' or 'line_search'."""
    x: numpy.ndarray
    f: float
    grad_norm: float
    iterations: int
    function_evaluations: int
    reason: str
    losses: list = field(default_factory=list)


def lbfgs_serial(f_and_g, x0, history: int, max_iter: int, *, grad_tol: float = 1e-6, loss_tol: float = 1e-10,
                 c1: float = C1, c2: float = C2) -> LBFGSResult:
    """Minimise ``f_and_g(x) -> (f, g)`` from ``x0`` (1-D float64) with the textbook two-loop L-BFGS.

    Same line search, first step, curvature test and stopping rules as ``ShardedLBFGS``; only the vectors are whole
    and the recursion is the classic one (Nocedal & Wright Algorithm 7.4), so it checks the sharded,
    vector-free formulation independently.
    """
    if history < 1:
        raise ValueError(f"history must be >= 1, got {history}")
    x = numpy.array(x0, dtype=numpy.float64)
    f, g = f_and_g(x)
    g = numpy.asarray(g, dtype=numpy.float64)
    evals, pairs = 1, []
    losses = [f]
    gnorm = float(numpy.linalg.norm(g))
    if gnorm <= grad_tol:
        return LBFGSResult(x, f, gnorm, 0, evals, "grad_tol", losses)
    reason, it = "max_iter", 0
    while it < max_iter:
        q = -g
        alphas = []
        for s, y, rho in reversed(pairs):
            a = rho * (s @ q)
            q = q - a * y
            alphas.append(a)
        if pairs:
            s, y, _ = pairs[-1]
            q *= (s @ y) / (y @ y)
        for (s, y, rho), a in zip(pairs, reversed(alphas)):
            b = rho * (y @ q)
            q = q + (a - b) * s
        d = q
        dphi0 = float(g @ d)
        if not dphi0 < 0:  # numerical loss of descent: forget the curvature pairs, go downhill
            pairs.clear()
            d = -g
            dphi0 = float(g @ d)
        cache = {}

        def phi(alpha):
            fa, ga = f_and_g(x + alpha * d)
            ga = numpy.asarray(ga, dtype=numpy.float64)
            cache[alpha] = (fa, ga)
            return fa, float(ga @ d)

        ls = strong_wolfe(phi, f, dphi0, initial_step(bool(pairs), gnorm), c1=c1, c2=c2)
        evals += ls.evals
        it += 1
        if ls.alpha == 0:
            reason = "line_search"
            it -= 1
            break
        f_new, g_new = cache[ls.alpha]
        s = ls.alpha * d
        y = g_new - g
        sy = float(s @ y)
        yy = float(y @ y)
        if sy > CURVATURE_EPS * yy:
            pairs.append((s, y, 1.0 / sy))
            if len(pairs) > history:
                pairs.pop(0)
        x, f_old, f, g = x + s, f, f_new, g_new
        losses.append(f)
        gnorm = float(numpy.linalg.norm(g))
        if gnorm <= grad_tol:
            reason = "grad_tol"
            break
        if relative_decrease(f_old, f) <= loss_tol:
            reason = "loss_tol"
            break
    return LBFGSResult(x, f, gnorm, it, evals, reason, losses)
