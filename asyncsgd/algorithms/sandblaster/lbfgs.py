"""L-BFGS with its vectors sharded over ranks (Sandblaster's optimizer).

Sandblaster's optimizer (Dean et al. 2012): every rank owns one contiguous shard of the parameter vector, of the
gradient, of the search direction and of the L-BFGS history (``history`` pairs s, y).  No rank ever holds a whole
history vector; the coordinator logic only needs scalars:

- dot products are local partial sums plus one ``Allreduce`` per batch of dots.  The search direction uses the
  vector-free two-loop recursion (Chen et al. 2014): one Gram matrix of the basis {s_i, y_i, g} is reduced in a
  single Allreduce, the recursion runs on its (2m+1)^2 scalars, and the direction is a local linear combination;
- scale and axpy are local;
- a function evaluation gathers the parameter shards (``Allgatherv``: the replicas' "fetch"), lets the caller sum
  per-example losses and gradients over whatever examples this rank was given, sums the gradients to the shard
  owners with ``Reduce_scatter`` and reduces [loss, |g|^2, g.d, |x|^2] in one ``Allreduce``.

Every rank runs the same scalar recursion on the same reduced scalars (MPI sums are bitwise identical on all ranks
for a commutative op), so branches of the line search agree everywhere without a broadcast.

The line search lives in ``linesearch.py``; the tests compare this optimizer with a textbook single-process
L-BFGS (``tests/support/lbfgs_reference.py``) that uses the same line search.
"""
from __future__ import annotations

import math

import numpy

from asyncsgd.runtime.mpi import wait
from asyncsgd.data.partition import contiguous_bounds
from asyncsgd.algorithms.sandblaster.linesearch import (C1, C2, CURVATURE_EPS, LineSearchResult, initial_step,
                    relative_decrease, strong_wolfe)

__all__ = ["shard_bounds", "ShardedEvaluator", "ShardedLBFGS"]


def shard_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """Split ``range(n)`` into ``parts`` contiguous (start, stop) ranges whose sizes differ by at most one."""
    return list(contiguous_bounds(n, parts, allow_empty=True))


# ---------------------------------------------------------------------------------------------------------------
# Sharded evaluation and optimizer


class ShardedEvaluator:
    """Evaluate f(x) = (sum of per-example losses)/n + l2/2 |x|^2 and its gradient, sharded over ``comm``.

    ``local_sums(x_full) -> (loss_sum, grad_sum, n_examples)``: this rank's share of the data, as sums over
    examples (grad_sum a float64 (n,) array; it may be overwritten).  Shares of all ranks must partition the
    examples of the objective.  ``x_full`` (n,) float64 is this rank's gathered copy of the parameters (read-only).
    ``check`` (run-through of a dead rank): a callable run between polls of every wait, raising when a rank of the
    job died, so a rank waiting here leaves as soon as a peer revoked the job.
    """

    def __init__(self, comm, n: int, local_sums, *, l2: float = 0.0, poll: bool = True, check=None):
        self.comm = comm
        self.n = n
        self.local_sums = local_sums
        self.l2 = float(l2)
        self.poll = poll
        self.check = check
        self.bounds = shard_bounds(n, comm.size)
        self.lo, self.hi = self.bounds[comm.rank]
        self.counts = [b - a for a, b in self.bounds]
        self.displs = [a for a, _ in self.bounds]
        self.x_full = numpy.zeros(n, dtype=numpy.float64)
        self.evaluations = 0

    def _wait(self, req):
        # A rank waiting in a blocking MPICH collective spins and steals a core from ranks still computing.
        if self.check is not None:
            import time
            while not req.Test():
                self.check()
                time.sleep(0.001)
        elif self.poll:
            wait(req)
        else:
            req.Wait()

    def gather(self, x_shard):
        """Allgatherv the shards into ``self.x_full`` (every replica's 'fetch'); return it."""
        from mpi4py import MPI
        self._wait(self.comm.Iallgatherv(numpy.ascontiguousarray(x_shard, dtype=numpy.float64),
                                         [self.x_full, self.counts, self.displs, MPI.DOUBLE]))
        return self.x_full

    def allreduce(self, values):
        """Sum a small float64 vector of partial sums over ranks (one Iallreduce); return the sums."""
        from mpi4py import MPI
        send = numpy.asarray(values, dtype=numpy.float64)
        out = numpy.empty_like(send)
        self._wait(self.comm.Iallreduce(send, out, op=MPI.SUM))
        return out

    def __call__(self, x_shard, d_shard=None):
        """Return (f, g_shard, |g|^2, g.d) at the parameters whose shard here is ``x_shard`` (g.d = 0 without d)."""
        from mpi4py import MPI
        self.evaluations += 1
        x_full = self.gather(x_shard)
        loss_sum, grad_sum, count = self.local_sums(x_full)
        grad_sum = numpy.ascontiguousarray(grad_sum, dtype=numpy.float64)
        G = numpy.empty(self.hi - self.lo, dtype=numpy.float64)
        self._wait(self.comm.Ireduce_scatter(grad_sum, G, self.counts, op=MPI.SUM))
        # g = G/N + l2 x with G the summed gradient over N examples; |g|^2 and g.d expand into dots of G and x, so
        # the loss, N and every dot travel in ONE Allreduce of partial sums.
        d = numpy.zeros_like(G) if d_shard is None else d_shard
        tot = self.allreduce([loss_sum, count, G @ G, G @ x_shard, x_shard @ x_shard, G @ d, x_shard @ d])
        n_ex, l2 = tot[1], self.l2
        if n_ex <= 0:
            raise ValueError("the objective covers no examples: every rank returned n_examples = 0")
        G /= n_ex
        if l2:
            G += l2 * x_shard
        gg = tot[2] / n_ex**2 + 2 * l2 * tot[3] / n_ex + l2 * l2 * tot[4]
        gd = tot[5] / n_ex + l2 * tot[6]
        f = float(tot[0] / n_ex + 0.5 * l2 * tot[4])
        return f, G, float(max(gg, 0.0)), float(gd)


class ShardedLBFGS:
    """L-BFGS on parameter shards; every rank of ``evaluate.comm`` calls every method (they are collective).

    ``evaluate`` is a ShardedEvaluator; ``x_shard`` this rank's slice of the starting point.  History rows live in
    one (2P+1, shard) array H with P = m+1 pair slots (one spare, so a new pair never overwrites the oldest before
    it is accepted): rows 0..P-1 hold s vectors, P..2P-1 the matching y, row 2P the current gradient.
    """

    def __init__(self, evaluate, x_shard, history: int, *, c1: float = C1, c2: float = C2):
        if history < 1:
            raise ValueError(f"history must be >= 1 (L-BFGS needs at least one (s, y) pair), got {history}")
        self.evaluate = evaluate
        self.m = history
        self.P = history + 1
        self.c1, self.c2 = c1, c2
        self.x = numpy.array(x_shard, dtype=numpy.float64)
        self.H = numpy.zeros((2 * self.P + 1, self.x.size), dtype=numpy.float64)
        self.order = []  # pair slots, oldest first; the newest may still await its curvature test
        self.pending = False
        self.f = self.gnorm = None
        self.function_evaluations = 0
        self.iterations = 0

    @property
    def g(self):
        """This rank's shard of the current gradient (a view)."""
        return self.H[2 * self.P]

    def refresh(self):
        """Evaluate f and g at the current point (at the start, and whenever the objective's batch changed)."""
        f, g, gg, _ = self.evaluate(self.x)
        self.function_evaluations += 1
        self.f, self.gnorm = f, math.sqrt(gg)
        self.g[:] = g
        return f

    def reset_history(self):
        """Forget all (s, y) pairs (the next step is steepest descent)."""
        self.order.clear()
        self.pending = False

    def direction(self):
        """Return (d_shard, g.d): the vector-free two-loop recursion on one Allreduced Gram matrix of H's rows."""
        P = self.P
        gslot = 2 * P
        gram = self.evaluate.allreduce(self.H @ self.H.T).reshape(2 * P + 1, 2 * P + 1)
        if self.pending:
            # Curvature test of the newest pair, from the Gram matrix instead of an extra reduction.
            j = self.order[-1]
            if not gram[j, P + j] > CURVATURE_EPS * gram[P + j, P + j]:
                self.order.pop()
            self.pending = False
        while len(self.order) > self.m:
            self.order.pop(0)
        delta = numpy.zeros(2 * P + 1)
        delta[gslot] = -1.0
        alphas = []
        for i in reversed(self.order):  # newest first
            a = (delta @ gram[:, i]) / gram[i, P + i]
            delta[P + i] -= a
            alphas.append(a)
        if self.order:
            j = self.order[-1]
            delta *= gram[j, P + j] / gram[P + j, P + j]
        for i, a in zip(self.order, reversed(alphas)):  # oldest first
            b = (delta @ gram[:, P + i]) / gram[i, P + i]
            delta[i] += a - b
        gd = float(delta @ gram[:, gslot])
        if not gd < 0:  # rounding destroyed descent: drop the pairs and go downhill
            self.reset_history()
            delta[:] = 0.0
            delta[gslot] = -1.0
            gd = -float(gram[gslot, gslot])
        return delta @ self.H, gd

    def step(self) -> LineSearchResult:
        """Take one L-BFGS iteration from the current point (refresh() must have run); return the line search.

        A returned ``alpha`` of 0 means no step was taken (zero gradient, or the line search found no decrease).
        """
        d, dphi0 = self.direction()
        if dphi0 == 0:  # zero gradient: nothing to do
            return LineSearchResult(0.0, self.f, 0.0, 0, False)
        last = {}

        def phi(alpha):
            out = self.evaluate(self.x + alpha * d, d)
            last.update(alpha=alpha, out=out)
            return out[0], out[3]

        ls = strong_wolfe(phi, self.f, dphi0, initial_step(bool(self.order), self.gnorm), c1=self.c1, c2=self.c2)
        self.function_evaluations += ls.evals
        if ls.alpha == 0:
            return ls
        if last["alpha"] != ls.alpha:  # the line search fell back to an earlier point: recompute its gradient
            phi(ls.alpha)
            self.function_evaluations += 1
        f, g_new, gg, _ = last["out"]
        slot = next(s for s in range(self.P) if s not in self.order)
        self.H[slot] = ls.alpha * d
        self.H[self.P + slot] = g_new - self.g
        self.order.append(slot)
        self.pending = True
        self.x += self.H[slot]
        self.g[:] = g_new
        self.f, self.gnorm = f, math.sqrt(gg)
        self.iterations += 1
        return ls

    def minimize(self, max_iter: int, *, grad_tol: float = 1e-6, loss_tol: float = 1e-10, callback=None) -> str:
        """Iterate until a stopping rule holds; return the reason ('grad_tol', 'loss_tol', 'max_iter',
        'line_search', or 'callback' when ``callback(self)`` returns True after an iteration).

        The rules are lbfgs_serial's, so both stop at the same iteration on the same problem.
        """
        if self.f is None:
            self.refresh()
        if self.gnorm <= grad_tol:
            return "grad_tol"
        while self.iterations < max_iter:
            f_old = self.f
            if self.step().alpha == 0:
                return "line_search"
            if callback is not None and callback(self):
                return "callback"
            if self.gnorm <= grad_tol:
                return "grad_tol"
            if relative_decrease(f_old, self.f) <= loss_tol:
                return "loss_tol"
        return "max_iter"
