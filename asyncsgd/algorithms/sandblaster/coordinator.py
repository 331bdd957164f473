"""Sandblaster L-BFGS (Dean et al. 2012): batch L-BFGS with sharded vectors and dynamically balanced replicas.

Every rank is both a parameter/history shard owner and a model replica; rank 0 is also the coordinator (it hosts
the mini-shard windows and writes the log).  One iteration:

1. the direction: the vector-free two-loop recursion on one Allreduced Gram matrix (``lbfgs.ShardedLBFGS``);
2. each trial point of the strong-Wolfe line search is one function evaluation: ``Allgatherv`` of the shards into
   every replica's model (the fetch), the batch's mini-shards computed by whichever replica claims them
   (``minishards.MiniShardScheduler``: Fetch_and_op claims, backup copies, Compare_and_swap picks the copy that
   counts), each replica's winning gradients summed locally and ``Reduce_scatter``-ed to the shard owners, and one
   Allreduce of [loss, count, dots];
3. bookkeeping: test accuracy (each rank evaluates a slice of the test set) and the scheduler counts, reduced in one
   Allreduce; rank 0 records them.

Defaults when an option is None (``asyncsgd.plan.sandblaster_defaults``): the whole training set as one batch for logreg (a fixed convex
objective: L-BFGS converges to its unique optimum); for the CNNs mini-batch L-BFGS on batches of 256 examples, each
kept for 3 iterations before the next is drawn (a full FSDD batch costs about a minute per evaluation on 2 cores;
measured on FSDD, accuracy per example processed was the same for batches of 128 re-drawn every iteration and for
256 kept 3 iterations, and better than for 256 or 512 re-drawn every iteration).  A new batch (and dropout, whose
masks are drawn per batch and mini-shard) changes the objective, so the gradient at the current point is
re-evaluated on the new batch, while each (s, y) pair is taken on the batch where both of its gradients were
measured.
L2 penalty ``l2/2 |x|^2``: 1e-4 by default (for logreg it makes the optimum unique; separable data would otherwise
have none).  Mini-shards: batch / (8 x ranks) examples, so there are many more mini-shards than replicas.
``--slow-ranks`` (tests and benchmarks only) makes ranks stragglers.
"""
from __future__ import annotations

import time

import numpy
from mpi4py import MPI

from asyncsgd.runtime.faults import fault_point
from asyncsgd.runtime.mpi import polled_barrier, wait
from asyncsgd.model.layers import Dropout
from asyncsgd.algorithms.sandblaster.lbfgs import ShardedEvaluator, ShardedLBFGS, shard_bounds
from asyncsgd.algorithms.sandblaster.linesearch import relative_decrease
from asyncsgd.algorithms.sandblaster.minishards import (BatchStats, MiniShardScheduler, mini_shard_bounds,
                    mini_shard_rows)
from asyncsgd.ulfm.replica_guard import ReplicaGuard

__all__ = ["run", "Replica", "build_evaluator"]

_MAX_FAILED_SEARCHES = 3  # stochastic batches: give up after this many line searches in a row found no decrease



class Replica:
    """One rank's model replica: computes mini-shards of the current batch and sums the winning gradients."""

    def __init__(self, net, backend, x, y, seed: int):
        self.net, self.backend = net, backend
        self.x, self.y = x, y
        self.seed = seed
        self.stochastic_masks = any(isinstance(layer, Dropout) for layer in net.layers)
        self.grad_sum = numpy.zeros(net.n_params, dtype=numpy.float64)
        self.grad_host = numpy.zeros(net.n_params, dtype=net.dtype)
        self.batch_no = 0
        self.rows = None
        self.bounds = None
        self.loss_sum = 0.0
        self.count = 0

    def set_batch(self, batch_no: int, rows, bounds):
        """Use training rows ``rows`` (int array) cut into ``bounds`` mini-shards for the following evaluations."""
        self.batch_no, self.rows, self.bounds = batch_no, rows, bounds

    def load(self, x_full):
        """Copy the gathered parameters (float64) into the model."""
        self.net.params[...] = self.backend.to_device(x_full.astype(self.net.dtype, copy=False))

    def compute(self, i):
        a, b = self.bounds[i]
        idx = self.rows[a:b]
        xb = self.backend.to_device(self.x[idx])
        yb = self.backend.to_device(self.y[idx])
        # Dropout masks fixed per (batch, mini-shard): every trial point of a line search, and every backup copy,
        # sees the same function, so the line search works on a deterministic objective.
        rng = self.net.ops.make_rng((self.seed * 1_000_003 + self.batch_no) * 100_003 + i)
        fault_point("minishard")
        loss = self.net.loss_and_grad(xb, yb, rng=rng)
        return loss, b - a

    def accept(self, i, result):
        loss, n = result
        self.backend.to_host(self.net.grads, out=self.grad_host)
        self.grad_sum += n * self.grad_host.astype(numpy.float64, copy=False)
        self.loss_sum += n * loss
        self.count += n

    def start_sums(self):
        self.grad_sum[:] = 0.0
        self.loss_sum, self.count = 0.0, 0


def build_evaluator(comm, replica: Replica, sched: MiniShardScheduler, *, l2: float, on_batch=None, check=None):
    """Return the ShardedEvaluator whose local sums are the replica's winning mini-shards of its current batch.

    ``on_batch(stats, examples)`` receives each evaluation's BatchStats and the examples summed on this rank;
    ``check`` is the failure probe of a run-through (see ``ShardedEvaluator``), or None.
    """
    def local_sums(x_full):
        replica.load(x_full)
        replica.start_sums()
        stats = sched.run_batch(len(replica.bounds), replica.compute, replica.accept)
        if on_batch is not None:
            on_batch(stats, replica.count)
        return replica.loss_sum, replica.grad_sum, replica.count

    return ShardedEvaluator(comm, replica.net.n_params, local_sums, l2=l2, check=check)


class _Counts:
    """Scheduler counts of this rank summed over the evaluations of one iteration."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.batch = BatchStats()
        self.examples = 0

    def add(self, stats: BatchStats, examples: int):
        for f in ("done", "computed", "launched", "backups_discarded", "originals_lost"):
            setattr(self.batch, f, getattr(self.batch, f) + getattr(stats, f))
        self.examples += examples


def _draw_batch(rng, n_train: int, batch: int):
    """Rows of the next batch: all rows in order for a full batch, else a random subset (same on every rank)."""
    if batch >= n_train:
        return numpy.arange(n_train)
    return numpy.sort(rng.choice(n_train, size=batch, replace=False))


def run(comm, net, src, opts, stop, backend, reporter, *, plan=None, model_name="model", checkpointer=None,
        resume=None):
    """Train ``net`` with Sandblaster L-BFGS (SandblasterOptions ``opts``) over every rank of ``comm``; return the
    summary on rank 0.  ``net`` should have the dtype ``asyncsgd.plan.network_dtype`` gives (float64 for logreg).

    ``plan`` is the run's RunPlan (asyncsgd.plan; made here from the arguments when None): the effective settings
    (``plan.lbfgs``) and whether the run is fault tolerant.  Checkpoints and resuming are not supported: the plan
    refuses them (asyncsgd.plan.check_inputs), so ``checkpointer`` and ``resume`` stay None."""
    if plan is None:
        from asyncsgd.plan import plan_for
        plan = plan_for("sandblaster", comm, src, opts, stop, model_name=model_name, n_params=net.n_params,
                        resumed=resume is not None)
    # the Dup is the run's working communicator: a run through a dead rank replaces it, _run frees the current one
    # (not in a `finally`: after an exception on one rank no collective may run, docs/FAILURES.md)
    return _run(comm.Dup(), net, src, plan, backend, reporter)


class _OnComm:
    """What lives on the job's communicator and is built again on the survivors after a rank died: the mini-shard
    scheduler (windows on rank 0), the sharded evaluator and L-BFGS state (shards of x and of the history), and
    this rank's slice of the test set."""

    def __init__(self, guard: ReplicaGuard, replica, counts, opts, *, n_ms, slow, l2, test, x_full):
        comm = guard.comm
        check = guard.check if guard.enabled else None
        self.comm = comm
        self.sched = MiniShardScheduler(comm, n_ms, schedule=opts.schedule, slow_factor=slow, check=check)
        self.evaluate = build_evaluator(comm, replica, self.sched, l2=l2, on_batch=counts.add, check=check)
        self.opt = ShardedLBFGS(self.evaluate, x_full[self.evaluate.lo:self.evaluate.hi], opts.history)
        lo, hi = shard_bounds(len(test[1]), comm.size)[comm.rank]
        self.x_test, self.y_test = test[0][lo:hi], test[1][lo:hi]
        self.check = check


def _run(comm, net, src, plan, backend, reporter):
    opts, stop, model_name, eff = plan.options, plan.stop, plan.model_name, plan.lbfgs
    size, rank = comm.size, comm.rank
    slow = opts.slow_ranks.get(rank, 1.0)
    batch, ms_size, l2 = eff["batch_size"], eff["mini_shard_size"], eff["l2"]
    per_batch = eff["iterations_per_batch"]
    # Any replica may be handed any mini-shard, so each holds the training set (FSDD: 28 MB).
    x_train, y_train = src.train_range(0, src.n_train)
    test = src.test_set()
    replica = Replica(net, backend, x_train, y_train, opts.seed)
    n_ms = len(mini_shard_bounds(batch, ms_size))  # the same after a shrink: the mini-shard size stays
    stochastic = batch < src.n_train or replica.stochastic_masks
    batch_rng = numpy.random.default_rng(opts.seed + 7)
    counts = _Counts()
    polled_barrier(comm)  # one start for every rank: --kill-ranks and the log's times agree
    guard = ReplicaGuard(comm, enabled=plan.fault_tolerant, start=time.monotonic(), reporter=reporter,
                         kill_ranks=opts.kill_ranks, root_lost_hint="sandblaster writes no checkpoints, so "
                         "--resume cannot continue it: start the run again")
    guard.arm_kill(opts.kill_ranks.get(rank))
    x0 = backend.to_host(net.params).astype(numpy.float64)
    parts = _OnComm(guard, replica, counts, opts, n_ms=n_ms, slow=slow, l2=l2, test=test, x_full=x0)
    # With fault tolerance every survivor keeps the whole current iterate: the dead rank's shard of x is restored
    # from it (the shards of the history are not: see _rebuild).
    iterate = x0.copy() if guard.enabled else None

    def next_batch():
        rows = _draw_batch(batch_rng, src.n_train, batch)
        replica.set_batch(replica.batch_no + 1, *mini_shard_rows(rows, ms_size, y_train[rows]))
        parts.opt.refresh()

    start = time.perf_counter()
    totals = numpy.zeros(4, dtype=numpy.int64)  # launched, backups discarded, originals lost, examples
    reason, failed, accuracy, test_loss = "max_iter", 0, None, None
    new_batch, done, first = False, False, "batch"  # first: draw a batch, or "refresh" on the current one
    at_iterate = (0, 0)  # (iterations, function evaluations) at ``iterate``
    while True:
        try:
            if not done:
                if first == "batch":
                    next_batch()
                elif first == "refresh":
                    parts.opt.refresh()  # the objective at the restored iterate, summed by the survivors
                    if rank == 0:
                        guard.stepped()
                first = None
                opt, evaluate = parts.opt, parts.evaluate
                while opt.iterations < eff["max_iter"]:
                    if new_batch:
                        next_batch()
                    f_old = opt.f
                    ls = opt.step()
                    stepped = ls.alpha != 0
                    failed = 0 if stepped else failed + 1
                    if not stepped:  # the model holds the last rejected trial point: put the current one back
                        replica.load(evaluate.gather(opt.x))
                    if iterate is not None:  # the last gather was at the current point (see _rebuild)
                        iterate[:] = evaluate.x_full
                        at_iterate = (opt.iterations, opt.function_evaluations)
                    test_loss, accuracy, done_per_rank, it_counts, elapsed = _bookkeeping(
                        parts.comm, net, parts.x_test, parts.y_test, counts, time.perf_counter() - start, parts.check)
                    counts.reset()
                    totals += it_counts
                    if reporter is not None and stepped:
                        fault_point("coordinator")  # rank 0 only: the coordinator's log
                        reporter.record({"time": elapsed, "iteration": opt.iterations, "loss": opt.f,
                                         "grad_norm": opt.gnorm, "test_loss": test_loss, "test_accuracy": accuracy,
                                         "step": ls.alpha, "function_evaluations": opt.function_evaluations,
                                         "minishards_per_rank": done_per_rank, "backups_launched": int(it_counts[0]),
                                         "backups_discarded": int(it_counts[1]),
                                         "stragglers_beaten": int(it_counts[2]),
                                         "samples_per_s": totals[3] / max(elapsed, 1e-9)})
                    if not stepped and (not stochastic or failed >= _MAX_FAILED_SEARCHES):
                        reason = "line_search"
                        break
                    if stepped and opt.gnorm <= opts.grad_tol:
                        reason = "grad_tol"
                        break
                    if stepped and relative_decrease(f_old, opt.f) <= opts.loss_tol:
                        reason = "loss_tol"
                        break
                    # rank 0's clock, carried in the bookkeeping reduction: every rank stops at the same iteration
                    if stop.time_limit is not None and elapsed >= stop.time_limit:
                        reason = "time_limit"
                        break
                    if stop.target_accuracy is not None and accuracy is not None and accuracy >= stop.target_accuracy:
                        reason = "target_accuracy"
                        break
                    new_batch = stochastic and (opt.iterations % per_batch == 0 or not stepped)
                done = True
            guard.final_meet()  # with fault tolerance: a survivor still iterating may need this rank back
            break
        except Exception as exc:
            if not guard.is_failure(exc):
                guard.end_if_failure(exc)
                parts.sched.__exit__(type(exc), exc, exc.__traceback__)  # the WindowOwner exit: no collective
                raise
            state = None
            if guard.comm.rank == 0:
                state = {"x": iterate, "at": at_iterate, "f": parts.opt.f, "gnorm": parts.opt.gnorm,
                         "done": done, "reason": reason, "failed": failed, "accuracy": accuracy,
                         "test_loss": test_loss, "totals": totals, "batch_rng": batch_rng.bit_generator.state,
                         "batch": (replica.batch_no, replica.rows, replica.bounds)}
            state = guard.recover(state)
            parts.sched.abandon()
            parts = _rebuild(guard, replica, counts, opts, state, n_ms=n_ms, slow=slow, l2=l2, test=test)
            iterate = numpy.array(state["x"], dtype=numpy.float64)
            done, reason, failed = state["done"], state["reason"], state["failed"]
            accuracy, test_loss, totals = state["accuracy"], state["test_loss"], numpy.array(state["totals"])
            batch_rng.bit_generator.state = state["batch_rng"]
            replica.set_batch(*state["batch"])
            counts.reset()
            new_batch, first = False, "refresh"
            rank = guard.comm.rank
            at_iterate = state["at"]
    fault_point("end")
    wall = time.perf_counter() - start
    opt = parts.opt
    params = backend.to_host(net.params).copy() if rank == 0 else None
    parts.sched.free()
    summary = guard.summary()
    guard.free()
    if rank != 0:
        return None
    return {"mode": "sandblaster", "model": model_name, "data": src.name, "iterations": opt.iterations,
            "final_loss": opt.f, "grad_norm": opt.gnorm, "function_evaluations": opt.function_evaluations,
            "backups_launched": int(totals[0]), "backups_discarded": int(totals[1]),
            "stragglers_beaten": int(totals[2]), "test_accuracy": accuracy, "test_loss": test_loss,
            "wall_s": wall, "samples": int(totals[3]), "samples_per_s": totals[3] / max(wall, 1e-9),
            "stop_reason": reason, "batch_size": batch, "mini_shard_size": ms_size, "l2": l2,
            "history": opts.history, "schedule": opts.schedule, "workers": size, "servers": size,
            "n_params": int(net.n_params), "params": params, "layout": net.param_layout(), **summary}


def _rebuild(guard, replica, counts, opts, state, **kw) -> _OnComm:
    """Build the scheduler, the evaluator and the L-BFGS state again on the survivors, at rank 0's iterate.

    The parameters are re-sharded over the survivors from the full iterate every survivor holds.  The L-BFGS
    history is restarted, not rebuilt: the dead rank held a slice of every (s, y) pair, and restoring a y slice
    means recomputing the gradients at m past points on their batches, m function evaluations on fewer ranks,
    which costs about what the restarted history costs to regrow (the first steps are scaled steepest descent,
    and m iterations rebuild the curvature pairs), while the survivors' own slices alone define no pair.
    """
    parts = _OnComm(guard, replica, counts, opts, x_full=numpy.asarray(state["x"], dtype=numpy.float64), **kw)
    parts.opt.iterations, parts.opt.function_evaluations = state["at"]
    parts.opt.f, parts.opt.gnorm = state["f"], state["gnorm"]  # the summary's when rank 0 had finished
    return parts


def _bookkeeping(comm, net, x_test, y_test, counts: _Counts, elapsed: float, check=None):
    """Evaluate this rank's test slice and reduce it with the iteration's scheduler counts and rank 0's clock in one
    Allreduce.

    Returns (test loss, test accuracy, mini-shards done per rank, [launched, backups discarded, originals lost,
    examples], rank 0's elapsed seconds) on every rank; the net holds the accepted point (the line search's last
    evaluation).  ``check``: the failure probe of a run-through, run while waiting (or None).
    """
    size = comm.size
    loss_sum = correct = 0.0
    if len(y_test):
        fault_point("evaluate")
        mean_loss, acc = net.evaluate(x_test, y_test)
        loss_sum, correct = mean_loss * len(y_test), acc * len(y_test)
    b = counts.batch
    send = numpy.zeros(3 + size + 5, dtype=numpy.float64)
    send[:3] = loss_sum, correct, len(y_test)
    send[3 + comm.rank] = b.done
    send[3 + size:3 + size + 4] = b.launched, b.backups_discarded, b.originals_lost, counts.examples
    send[-1] = elapsed if comm.rank == 0 else 0.0
    out = numpy.empty_like(send)
    request = comm.Iallreduce(send, out, op=MPI.SUM)
    if check is None:
        wait(request)
    else:
        while not request.Test():
            check()
            time.sleep(0.001)
    n_test = out[2]
    test_loss = out[0] / n_test if n_test else None
    accuracy = out[1] / n_test if n_test else None
    done = [int(round(v)) for v in out[3:3 + size]]
    return test_loss, accuracy, done, numpy.rint(out[3 + size:3 + size + 4]).astype(numpy.int64), float(out[-1])
