"""Downpour SGD (Dean et al. 2012, Algorithm 1.1) with Chan & Lane's sparse, momentum and staleness-decayed updates.

Ranks 0..S-1 host the parameter shards (``ShardedParameters``); the other ranks are model replicas.  A replica
fetches the parameters every ``n_fetch`` steps, takes local steps on its own slice of the training set, accrues the
update, and pushes it every ``n_push`` steps with one-sided accumulates, never waiting for a server's CPU.  Rank 0
also evaluates the test set every ``eval_every`` seconds, reports progress, and raises the stop flag on the job board
when the target accuracy is reached (``monitor``); ``training.run`` sets the roles up.  This module is the replica.

What a push carries:
- ``--optimizer sgd``: the parameter delta the replica applied locally since its last push (momentum included),
  scaled by the staleness weight;
- ``--optimizer adagrad``: the accrued (momentum-smoothed) gradient; the store turns it into
  ``-lr * g / sqrt(sum g^2 + eps)`` one-sidedly (DistBelief's Adagrad at the parameter server).
With ``--sparsity F < 1`` only the largest-magnitude fraction F of (accrued + residual) is pushed; the rest stays in
the residual for later pushes (error feedback), and the velocity of the pushed coordinates is cleared (momentum
factor masking, Lin et al. 2018, Deep Gradient Compression).  A worker's last push is dense and carries accrued +
residual whole, so everything a worker accrued reaches the store.

The learning rate follows ``lr_schedule`` as a function of *global* progress: at each fetch a worker turns the
store's version (pushes by every worker so far) into the fraction of the run done (asyncsgd.schedule.global_progress),
so asynchronous replicas decay together whatever their own speed; two workers that fetched the same version apply
the same rate.

Staleness tau of a push: the other workers' pushes that started before it and had not landed when this worker's
last fetch began (``ShardedParameters.push`` states the bound); a worker's own pushes never count.

``--sparse-block B`` makes sparse pushes choose whole blocks of B consecutive entries (``select_topk_blocks``): the
store then sends a few long runs instead of scattered indices, which is what makes a sparse push cheap across a
network (docs/NETWORK.md).

``--overlap push|all`` (DistBelief's fetch and push threads): a worker's store calls run in a communication thread
(``overlap.CommThread``, calls in submission order) while it computes.
- ``push``: the push travels while the next steps compute.  A fetch is submitted at its fetch point ahead of the
  push just prepared and waited for, so the parameters are as fresh as inline and tau as small.
- ``all``: the fetch too: at a fetch point the worker applies the fetch it submitted at the previous fetch point and
  submits the next one, so nothing waits for the network but the parameters are one fetch interval older (tau
  grows by about the pushes of one interval).
Either way the replica computes on the fetched parameters plus its own local steps that the fetch cannot hold
(``since_fetch``: those after the last push queued ahead of the fetch).  A push's base version is the version of
the fetch applied before its steps and its ticket is taken when the thread starts it, so tau keeps its bound; the
final push is made inline after everything submitted has landed, so the store ends at the same sum as inline.
"""
from __future__ import annotations

import sys
import time
import warnings

import numpy
from mpi4py import MPI

from asyncsgd.data import BatchStream
from asyncsgd.data.augment import make_augmenter
from asyncsgd.runtime.faults import fault_point
from asyncsgd.schedule import global_progress
from asyncsgd.backends.sparse import select_topk_blocks
from asyncsgd.store import ShardedParameters
from asyncsgd.rma.board import FLAG_STOP, FLAG_WARM_DONE, HIST_BINS
from asyncsgd.algorithms.common import StopRule
from asyncsgd.algorithms.downpour.overlap import CommThread, overlap_mode, overlap_refusal

__all__ = ["DownpourWorker", "worker_loop", "global_fraction"]

_FLAG_POLL_S = 0.01
# Under --overlap the store tests the thread's transfers this often instead of spinning in a blocking Flush:
# at 1 Gbit/s a socket drains about 60 KB in that time, far less than its buffer.
_COMM_POLL_S = 0.0005


def global_fraction(opts, budget, version: int, start: float, samples_before: int) -> float:
    """Global progress after ``version`` pushes (asyncsgd.schedule.global_progress); 0 without a budget."""
    if budget is None:
        return 0.0
    return global_progress(version, budget, batch_size=opts.batch_size, n_push=opts.n_push,
                           elapsed=time.monotonic() - start, samples_before=samples_before)


class DownpourWorker:
    """One model replica: local steps on its data, fetches and pushes against the store."""

    def __init__(self, opts, net, store: ShardedParameters, backend, *, seed: int, budget=None, start=None,
                 samples_before: int = 0, overlap=None, offers_replica: bool = False):
        """``opts`` DownpourOptions with ``lr`` filled in; ``budget`` the run's RunBudget in global samples (None:
        a constant rate); ``start`` the job's shared clock origin (time.monotonic() after the start barrier);
        ``samples_before`` samples done before a resume (the store's version restarts at 0); ``overlap``
        'off', 'push' or 'all' as resolved by the run's plan (RunPlan.overlap); None for a worker made on its own:
        ``opts.overlap``, off with a warning where MPI's thread level does not allow it.  ``offers_replica``
        (fault tolerance): keep the local steps since the last fetch apart, so ``fetched_params()`` can offer a
        recovery the parameters as fetched (one more vector the size of the model)."""
        self.opts = opts
        self.schedule = opts.lr_schedule.with_lr(opts.lr)
        self.budget = budget
        self.start = time.monotonic() if start is None else start
        self.samples_before = int(samples_before)
        self.lr = self.schedule.rate(self.progress(0))  # updated at every fetch
        self.net = net
        self.store = store
        self.backend = backend
        self.xp = backend.xp
        self.weight = opts.staleness  # a callable tau -> factor (asyncsgd.options)
        self.adagrad = opts.optimizer == "adagrad"
        self.velocity = self.xp.zeros_like(net.params)
        self.accrued = self.xp.zeros_like(net.params)
        # the residual lives where the accrual does: a GPU rank selects on the GPU and copies only the pairs
        self.residual = self.xp.zeros_like(net.params) if opts.sparsity < 1 else None
        # staging buffer between the replica and the windows (pinned on a GPU rank so copies run at full speed);
        # a replica whose parameters live in host memory fetches straight into them instead
        self.host = backend.staging_buffer(net.n_params, numpy.float32)
        self.params_on_host = isinstance(net.params, numpy.ndarray)
        self.rng = numpy.random.default_rng(seed)
        self.base_version = 0
        self.first_version = -1  # the store version of the first fetch (after a warm start: at least its pushes)
        self.steps = 0
        self.pushes = 0
        self.push_bytes = 0
        self.pushed_entries = 0
        self.skipped_nonfinite = 0
        self.hist = numpy.zeros(HIST_BINS)
        self.staleness_sum = 0
        self.compute_s = 0.0
        self.loss_ewma = None
        self.resumed_samples = 0  # samples done before a resume: counted in budgets, not in rates
        self._warned = False
        self.sparse_block = int(opts.sparse_block)
        self.comm_thread = None
        self.pushing = False
        self.dropped_pushes = 0
        # own local steps since the fetch of base_version: params == fetched + since_fetch at every safe point
        self.since_fetch = self.xp.zeros_like(net.params) if offers_replica else None
        why = None
        if overlap is None:
            overlap = overlap_mode(opts.overlap)
            why = overlap_refusal() if overlap != "off" else None
        self.overlap = overlap_mode(overlap)
        if self.overlap != "off":
            if why is None:
                self.comm_thread = CommThread()
                store.poll_s = _COMM_POLL_S  # the thread sleeps while its data travels, leaving the CPU to compute
                self.fetch_buf = backend.staging_buffer(net.n_params, numpy.float32)  # the thread's fetches
                if self.since_fetch is None:  # own local steps since the pending fetch left
                    self.since_fetch = self.xp.zeros_like(net.params)
                self._fetching = None  # Future of the fetch submitted at the last fetch point
                self._pushing = None  # Future of the last push submitted
                self._held = None  # 'push': a push prepared just before a fetch point, queued behind that fetch
            else:
                self.overlap = "off"
                warnings.warn(f"--overlap is off: {why}", RuntimeWarning, stacklevel=2)

    def progress(self, version: int) -> float:
        """The run's global progress after ``version`` pushes by all workers (0 without a budget)."""
        return global_fraction(self.opts, self.budget, version, self.start, self.samples_before)

    def fetch(self):
        """Copy the store's parameters into the replica (DistBelief's 'fetch'); set the rate from the version."""
        fault_point("fetch")
        if self.comm_thread is not None:
            (self._apply_prefetch if self.overlap == "all" else self._fetch_ahead_of_push)()
        elif self.params_on_host:
            self.base_version = self.store.fetch(self.net.params)
        else:
            self.base_version = self.store.fetch(self.host)
            self.net.params[...] = self.backend.to_device(self.host)
        if self.comm_thread is None and self.since_fetch is not None:
            self.since_fetch[...] = 0
        if self.first_version < 0:
            self.first_version = self.base_version
        if self.budget is not None:
            self.lr = self.schedule.rate(self.progress(self.base_version))

    def _fetch_ahead_of_push(self):
        """Overlap 'push': fetch now, ahead of the push held at the last push point (which then travels while the
        next steps compute); the replica adds its steps since the last push queued before this fetch."""
        fetching = self.comm_thread.submit(self.store.fetch, self.fetch_buf)
        held, self._held = self._held, None
        if held is not None:
            self._pushing = self.comm_thread.submit(held)
        version = fetching.result()
        self.xp.add(self.backend.to_device(self.fetch_buf), self.since_fetch, out=self.net.params)
        self.base_version = version
        if held is not None:
            self.since_fetch[...] = 0  # the held push's steps are behind this fetch in the queue, now in params

    def _apply_prefetch(self):
        """Overlap: take the fetch submitted at the last fetch point (the first one is waited for at once), add the
        local steps taken since it left, and submit the next one behind any push already submitted."""
        if self._fetching is None:
            self.since_fetch[...] = 0
            self._fetching = self.comm_thread.submit(self.store.fetch, self.fetch_buf)
        version = self._fetching.result()
        self._fetching = None
        self.xp.add(self.backend.to_device(self.fetch_buf), self.since_fetch, out=self.net.params)
        self.base_version = version
        self.since_fetch[...] = 0
        self._fetching = self.comm_thread.submit(self.store.fetch, self.fetch_buf)

    def fetched_params(self) -> tuple:
        """``(float32 host vector, version)``: the parameters as the last fetch brought them, without this replica's
        local steps since (which it still pushes), so a shard restored from them counts no step twice.  Needs
        ``offers_replica`` (or an overlap mode)."""
        if self.since_fetch is None:
            raise RuntimeError("fetched_params() needs DownpourWorker(..., offers_replica=True)")
        fetched = self.backend.to_host(self.net.params - self.since_fetch)
        return numpy.asarray(fetched, dtype=numpy.float32), self.base_version

    def step(self, xb, yb) -> bool:
        """Take one local step on a mini-batch; return False when the gradient was not finite (and skipped)."""
        opts, xp = self.opts, self.xp
        fault_point("step")
        t0 = time.perf_counter()
        loss = self.net.loss_and_grad(self.backend.to_device(xb), self.backend.to_device(yb), rng=self.rng)
        grads = self.net.grads
        if not (numpy.isfinite(loss) and bool(xp.isfinite(grads).all())):
            self.skipped_nonfinite += 1
            if not self._warned:
                warnings.warn(f"non-finite gradient at step {self.steps}: not pushed (skipped and counted; "
                              f"lower --lr if this repeats)", RuntimeWarning, stacklevel=2)
                self._warned = True
            self.compute_s += time.perf_counter() - t0
            return False
        # v = momentum*v + g; params -= lr*v (one fused kernel on a GPU rank); Adagrad pushes the accrued v
        self.backend.sgd_update(self.net.params, grads, lr=self.lr, momentum=opts.momentum, velocity=self.velocity,
                                accrued=self.accrued if self.adagrad else None)
        if not self.adagrad:
            self.accrued -= self.lr * self.velocity
        if self.since_fetch is not None:
            self.since_fetch -= self.lr * self.velocity  # the local step just taken (sgd_update's params -= lr*v)
        self.compute_s += time.perf_counter() - t0
        self.loss_ewma = loss if self.loss_ewma is None else 0.95 * self.loss_ewma + 0.05 * loss
        return True

    def push(self, *, final: bool = False):
        """Send the accrued update to the store, scaled by the staleness weight; reset the accrual.

        ``final``: the worker's last push.  In sparse mode it folds the residual into the accrual and pushes the
        sum densely, so nothing held back by error feedback is lost when the worker returns.
        """
        fault_point("push")
        self.pushing = True  # until the accrual is handed over: a failure in between leaves it True
        opts = self.opts
        inline = self.comm_thread is None or final
        if self.comm_thread is not None:
            self._collect_push()  # its buffers are free again, its tau counted
            if final:
                self.drain()
        if final and self.residual is not None:
            self.accrued += self.residual
            self.residual[...] = 0
        base, weight = self.base_version, self.weight
        if self.residual is not None and not final:
            if self.sparse_block > 1:
                idx_dev, vals = select_topk_blocks(self.accrued, opts.sparsity, self.residual, self.sparse_block)
            else:
                idx_dev, vals = self.backend.select_topk(self.accrued, opts.sparsity, self.residual)
            # momentum factor masking (Deep Gradient Compression): the velocity of coordinates just pushed is
            # cleared, so their delayed update is not pushed again through the momentum of later steps; without
            # it, sparse pushes with momentum 0.9 diverged in about one run in four on synthetic data
            self.velocity[idx_dev] = 0
            idx, vals = self.backend.to_host(idx_dev), self.backend.to_host(vals)  # fresh arrays every push
            if self.adagrad:
                def call(lr=self.lr):
                    return self.store.push_adagrad_sparse(idx, vals, lr, opts.adagrad_eps, base_version=base,
                                                          weight=weight)
            else:
                def call():
                    return self.store.push_sparse(idx, vals, base_version=base, weight=weight)
            self.push_bytes += idx.nbytes + vals.nbytes
            self.pushed_entries += idx.size
        else:
            # GPU: synchronises, then copies; the host buffer is the pushes' alone under overlap (fetch_buf fetches)
            update = self.backend.to_host(self.accrued, out=self.host)
            if self.adagrad:
                def call(lr=self.lr):
                    return self.store.push_adagrad(update, lr, opts.adagrad_eps, base_version=base, weight=weight)
            else:
                def call():
                    return self.store.push(update, base_version=base, weight=weight)
            self.push_bytes += update.nbytes
            self.pushed_entries += update.size
        if inline:
            self._count_tau(call())
        elif self.overlap == "push" and self.steps % opts.n_fetch == 0:
            self._held = call  # a fetch comes next: it goes first (fresh parameters), this push right behind it
        else:
            self._pushing = self.comm_thread.submit(call)
            if self.overlap == "push":
                self.since_fetch[...] = 0  # the next fetch will hold these steps
        self.accrued[...] = 0
        self.pushes += 1
        self.pushing = False

    def drop_accrual(self):
        """Forget the accrual of a push that a dead rank cut short (fault tolerance): pushed again, the part that
        reached the surviving shards would count twice."""
        self.accrued[...] = 0
        self.pushing = False
        self.dropped_pushes += 1

    def _count_tau(self, tau: int):
        self.staleness_sum += tau
        self.hist[min(tau, HIST_BINS - 1)] += 1

    def _collect_push(self):
        """Overlap: wait for the push in flight (re-raising its error) and count its staleness."""
        if self._pushing is not None:
            pushing, self._pushing = self._pushing, None
            self._count_tau(pushing.result())

    def drain(self):
        """Overlap: wait until every push (held ones too) has landed and the pending fetch has ended (no-op inline)."""
        if self.comm_thread is None:
            return
        held, self._held = self._held, None
        if held is not None:
            self._collect_push()
            self._pushing = self.comm_thread.submit(held)
        self._collect_push()
        if self._fetching is not None:
            fetching, self._fetching = self._fetching, None
            fetching.result()

    def finish(self):
        """Push what is left when the worker stops: the accrual since the last push and, sparse, the residual.

        Overlap: everything submitted lands first and the final push is made inline; the thread ends."""
        if self.steps % self.opts.n_push != 0 or self.residual is not None:
            self.push(final=True)
        self.close()

    def close(self):
        """Overlap: wait for what was submitted and end the communication thread (idempotent; no-op inline)."""
        if self.comm_thread is not None:
            try:
                self.drain()
            finally:
                self.comm_thread.close()

    def stats(self, samples: int, elapsed: float, done: bool = False) -> dict:
        return {"steps": self.steps, "samples": samples, "pushes": self.pushes, "push_bytes": self.push_bytes,
                "pushed_entries": self.pushed_entries, "skipped_nonfinite": self.skipped_nonfinite,
                "loss": self.loss_ewma if self.loss_ewma is not None else float("nan"),
                "staleness_sum": self.staleness_sum, "done": float(done), "compute_s": self.compute_s,
                "elapsed_s": elapsed, "resumed_samples": self.resumed_samples, "first_version": self.first_version,
                # fetches and pushes the communication thread ran (0 without --overlap): what the worker did
                "overlapped_calls": self.comm_thread.calls_run if self.comm_thread is not None else 0}


def worker_loop(plan, net, split, backend, store, board, worker, n_workers, start, samples_done=0,
                 budget=None, samples_before=0, guard=None):
    opts, stop_opts = plan.options, plan.stop
    src = split.src
    x, y = split.share(worker, n_workers)  # never a validation row
    # re-seeded from the position, so a resumed worker does not replay the order it already saw
    stream = iter(BatchStream(x, y, opts.batch_size, seed=opts.seed + 1000 + worker + samples_done))
    if plan.overlap_off_reason is not None:  # --overlap was asked for but cannot run here (RunPlan.overlap)
        warnings.warn(f"--overlap is off: {plan.overlap_off_reason}", RuntimeWarning, stacklevel=2)
    replica = DownpourWorker(opts, net, store, backend, seed=opts.seed + 2000 + worker + samples_done,
                             budget=budget, start=start, samples_before=samples_before, overlap=plan.overlap,
                             offers_replica=guard is not None and guard.enabled)
    augment = make_augmenter(opts.augment, src, seed=opts.seed + 3000 + worker + samples_done)
    stop = StopRule(stop_opts, samples_per_epoch=len(y), start=start)
    samples = replica.resumed_samples = samples_done
    last_publish = 0.0
    warm = plan.warm_start_steps if worker == 0 else 0  # 0 for a resumed run (asyncsgd.plan.warm_start_steps)
    if guard is not None and guard.enabled:  # what a recovery needs from this worker: its last fetch
        guard.replica = replica.fetched_params
    if worker != 0 and plan.warm_start_steps > 0:
        # DistBelief's warm start: one replica trains alone first; the others wait, sleeping, for its flag (a
        # recovery that loses that replica raises the flag: Recovery._move_rows)
        while board.flag(FLAG_WARM_DONE) == 0 and board.flag(FLAG_STOP) == 0:
            time.sleep(_FLAG_POLL_S)
            if guard is not None and guard.check():  # a safe point before any step, as in the loop below
                board, share = _rejoin(guard, replica, opts, stop_opts, split, start, samples)
                if share is None:
                    break
                worker, n_workers, stream, stop = share
    promoted = guard is not None and guard.role.kind == "server"  # while waiting: now hosts a dead server's shard
    for xb, yb in (() if promoted else stream):
        try:
            if replica.steps % opts.n_fetch == 0:
                replica.fetch()
            replica.step(augment(xb), yb)
            replica.steps += 1
            samples += len(yb)
            if replica.steps % opts.n_push == 0:
                replica.push()
            recovered = guard is not None and guard.check()  # a safe point (fault tolerance)
        except MPI.Exception as exc:
            # a store call that met a dead rank (a server on another host: osc/rdma reports it) recovers like a
            # safe point; a push cut short is dropped, never pushed again (its shards before the dead one have it)
            if guard is None or not guard.is_failure(exc):
                raise
            if replica.pushing:
                replica.drop_accrual()
                sys.stdout.write(f"asyncsgd: worker {worker}: a push cut short by a dead rank is dropped\n")
                sys.stdout.flush()
            guard.recover()
            recovered = True
        if recovered:  # a rank died, state rebuilt
            board, share = _rejoin(guard, replica, opts, stop_opts, split, start, samples)
            if share is None:
                break  # this worker now hosts a dead server's shard
            worker, n_workers, stream, stop = share
            replica.fetch()  # versions of the rebuilt store; the accrual since the last push is still pushed
            last_publish = 0.0
        if warm and replica.steps == warm:
            board.set_flag(FLAG_WARM_DONE)
        now = stop.elapsed()
        if stop.done(samples, replica.steps):
            break
        if now - last_publish >= 0.5:
            board.publish(worker, replica.stats(samples, now), replica.hist)
            last_publish = now
            if board.flag(FLAG_STOP):
                break
    replica.finish()
    if guard is not None and guard.role.kind == "server":
        return  # its row was retired by rank 0 at the recovery
    if warm and replica.steps < warm:
        board.set_flag(FLAG_WARM_DONE)  # ended before the warm start did: release the others
    board.publish(worker, replica.stats(samples, stop.elapsed(), done=True), replica.hist)


def _rejoin(guard, replica, opts, stop_opts, split, start, samples):
    """After a recovery at a worker's safe point: point the replica at the rebuilt store; return the rebuilt board
    and, while this rank is still a worker, its ``(worker, n_workers, stream, stop)`` over the survivors' share
    (None: it now hosts a dead server's shard)."""
    replica.store = guard.store
    if guard.role.kind == "server":
        return guard.board, None
    worker, n_workers = guard.role.index, guard.n_workers
    stream, stop = _take_over_share(opts, stop_opts, split, worker, n_workers, start, samples)
    return guard.board, (worker, n_workers, stream, stop)


def _take_over_share(opts, stop_opts, split, worker, n_workers, start, samples):
    """After a worker died: this worker's share of the training rows over the survivors (they cover it all again)."""
    x, y = split.share(worker, n_workers)  # never a validation row
    stream = iter(BatchStream(x, y, opts.batch_size, seed=opts.seed + 1000 + worker + samples))
    return stream, StopRule(stop_opts, samples_per_epoch=len(y), start=start)
