"""The strong-Wolfe line search shared by Sandblaster's sharded L-BFGS and the tests' serial reference.

Nocedal & Wright 2006, Algorithms 3.5 and 3.6, with cubic interpolation in zoom.  ``phi(alpha) -> (f, f')`` is the
objective along the search direction; the search touches only scalars, so every rank of a sharded optimizer runs it
identically on the same reduced values, with no broadcast.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["C1", "C2", "MAX_LINE_SEARCH_EVALS", "CURVATURE_EPS", "strong_wolfe", "LineSearchResult",
           "relative_decrease", "initial_step"]

C1 = 1e-4  # sufficient decrease (Armijo)
C2 = 0.9   # curvature; 0.9 is the usual choice for quasi-Newton methods
MAX_LINE_SEARCH_EVALS = 20
CURVATURE_EPS = 1e-10  # pairs with s.y <= eps * |y|^2 would make the inverse Hessian estimate indefinite


def relative_decrease(f_old: float, f_new: float) -> float:
    """Return (f_old - f_new) / max(|f_old|, |f_new|, 1), the loss-tolerance test of scipy's L-BFGS-B."""
    return (f_old - f_new) / max(abs(f_old), abs(f_new), 1.0)


def initial_step(iteration_has_history: bool, grad_norm: float) -> float:
    """First trial step: 1 once a Hessian scaling exists, else 1/|g| (a unit-length steepest-descent step)."""
    if iteration_has_history or grad_norm == 0:
        return 1.0
    return min(1.0, 1.0 / grad_norm)


# ---------------------------------------------------------------------------------------------------------------
# Line search


@dataclass
class LineSearchResult:
    """Outcome of one line search: step ``alpha`` with phi(alpha) = ``f`` and phi'(alpha) = ``dphi``.

    ``wolfe`` says whether both strong Wolfe conditions hold; when False, ``alpha`` > 0 still gives sufficient
    decrease if any trial point did, else ``alpha`` is 0 (no acceptable step).  ``evals`` counts calls of phi.
    """
    alpha: float
    f: float
    dphi: float
    evals: int
    wolfe: bool


def _cubic_min(a, fa, ga, b, fb, gb):
    """Minimiser of the cubic through (a, fa, ga) and (b, fb, gb) (Nocedal & Wright eq. 3.59), or None."""
    if a == b or not all(map(math.isfinite, (fa, ga, fb, gb))):
        return None
    d1 = ga + gb - 3.0 * (fa - fb) / (a - b)
    disc = d1 * d1 - ga * gb
    if disc < 0:
        return None
    d2 = math.copysign(math.sqrt(disc), b - a)
    den = gb - ga + 2.0 * d2
    if den == 0:
        return None
    return b - (b - a) * (gb + d2 - d1) / den


def strong_wolfe(phi, f0: float, dphi0: float, alpha0: float = 1.0, *, c1: float = C1, c2: float = C2,
                 max_evals: int = MAX_LINE_SEARCH_EVALS) -> LineSearchResult:
    """Find a step satisfying the strong Wolfe conditions along a descent direction.

    ``phi(alpha) -> (f, dphi)`` evaluates the objective and its directional derivative at x + alpha d.
    ``f0``, ``dphi0`` are their values at alpha = 0 (dphi0 < 0).  Bracketing doubles the step; zoom interpolates a
    cubic through the bracket ends, safeguarded to the middle 80% of the bracket (bisection otherwise).
    """
    if not dphi0 < 0:
        raise ValueError(f"line search needs a descent direction (phi'(0) < 0), got {dphi0}")
    evals = 0
    best = (0.0, f0, dphi0)  # lowest point with sufficient decrease so far (alpha 0 = none)

    def sufficient(a, f):
        return f <= f0 + c1 * a * dphi0

    def zoom(lo, hi):
        nonlocal evals, best
        while evals < max_evals:
            a_lo, f_lo, g_lo = lo
            a_hi, f_hi, g_hi = hi
            width = abs(a_hi - a_lo)
            if width <= 1e-16 * max(abs(a_lo), abs(a_hi), 1e-300):
                break
            a = _cubic_min(a_lo, f_lo, g_lo, a_hi, f_hi, g_hi)
            left, right = min(a_lo, a_hi), max(a_lo, a_hi)
            if a is None or not (left + 0.1 * width <= a <= right - 0.1 * width):
                a = 0.5 * (a_lo + a_hi)
            f, g = phi(a)
            evals += 1
            if not math.isfinite(f) or not sufficient(a, f) or f >= f_lo:
                hi = (a, f, g)
                continue
            if f < best[1]:
                best = (a, f, g)
            if abs(g) <= -c2 * dphi0:
                return LineSearchResult(a, f, g, evals, True)
            if g * (a_hi - a_lo) >= 0:
                hi = lo
            lo = (a, f, g)
        return None

    prev = (0.0, f0, dphi0)
    a = alpha0
    while evals < max_evals:
        f, g = phi(a)
        evals += 1
        if not math.isfinite(f) or not sufficient(a, f) or (evals > 1 and f >= prev[1]):
            res = zoom(prev, (a, f, g))
            break
        best = (a, f, g) if f < best[1] else best
        if abs(g) <= -c2 * dphi0:
            return LineSearchResult(a, f, g, evals, True)
        if g >= 0:
            res = zoom((a, f, g), prev)
            break
        prev = (a, f, g)
        a = 2.0 * a
    else:
        res = None
    if res is not None:
        return res
    return LineSearchResult(best[0], best[1], best[2], evals, False)


# ---------------------------------------------------------------------------------------------------------------
# Single-process reference
