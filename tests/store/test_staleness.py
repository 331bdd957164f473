"""Staleness is what the docs say: tau = the other workers' pushes that this push's fetch did not contain.

ShardedParameters.push states it: tau counts the other ranks' pushes that started before this push and had not
landed when its fetch began; it never under-counts, over-counts by at most ``fetch_overlap``, and never counts the
worker's own pushes.  Every push here adds 1 at its own index (push j: one-hot e_j), so the fetched buffer tells
exactly which pushes a fetch contained, and each test compares tau with that truth.  Scripts run one step at a time
between barriers (deterministic interleavings); a test subclass delays a push between its ticket and its data, or a
fetch between its version read and its Gets.
"""
from __future__ import annotations

import numpy as np
import pytest

from asyncsgd.runtime.mpi import polled_barrier
from asyncsgd.options import DownpourOptions, ExponentialDecay, NoDecay
from asyncsgd.schedule import Constant
from asyncsgd.store import ShardedParameters
from fakes import IntegerNet, train_worker
from mpi_checks import agree

pytestmark = pytest.mark.timeout(120, method="thread")

F32 = np.float32


class _Hooked(ShardedParameters):
    """A store whose next push pauses after its ticket, or whose next fetch pauses before its Gets (tests only)."""

    after_ticket = None   # callable run once, inside the next push, after the ticket and before the data
    before_gets = None    # callable run once, inside the next fetch, after the version read and before the Gets

    def _start_push(self, base_version, weight):
        result = super()._start_push(base_version, weight)
        hook, self.after_ticket = self.after_ticket, None
        if hook is not None:
            hook()
        return result

    def _read(self, out):
        hook, self.before_gets = self.before_gets, None
        if hook is not None:
            hook()
        return super()._read(out)


class _Worker:
    """A scripted worker: its last fetch (version, buffer, overlap) and what each of its pushes returned."""

    def __init__(self, store, n):
        self.store, self.n = store, n
        self.buf = np.zeros(n, F32)
        self.base = None
        self.overlap = 0
        self.pushes = []  # (push id, tau, fetched buffer at the time, overlap of that fetch)

    def fetch(self):
        self.base = self.store.fetch(self.buf)
        self.overlap = self.store.fetch_overlap

    def push(self, j, *, sparse=False):
        if sparse:
            tau = self.store.push_sparse(np.array([j]), np.ones(1, F32), base_version=self.base)
        else:
            delta = np.zeros(self.n, F32)
            delta[j] = 1
            tau = self.store.push(delta, base_version=self.base)
        self.pushes.append((j, tau, self.buf.copy(), self.overlap))


def _missing_others(buf, j, owner, started_before):
    """Pushes by other workers that started before push j and are not (wholly) in the fetched buffer."""
    return sum(1 for k in started_before if owner[k] != owner[j] and buf[k] != 1)


def _random_script(workers, n_steps, seed):
    """Return [(worker, 'fetch'|'push'|'sparse')]: every worker fetches first, then random fetches and pushes."""
    rng = np.random.default_rng(seed)
    script = [(w, "fetch") for w in workers]
    for _ in range(n_steps):
        w = int(rng.choice(workers))
        script.append((w, str(rng.choice(["fetch", "push", "push", "sparse"]))))
    return script


@pytest.mark.mpi(min_size=3)
@pytest.mark.ranks(3, 6)
def test_scripted_interleaving_taus_equal_the_pushes_missing_from_the_fetch(comm):
    """Random one-step-at-a-time scripts: tau == other workers' pushes missing from the fetch, exactly."""
    workers = list(range(1, comm.size))
    script = _random_script(workers, 12 * len(workers), seed=comm.size)
    push_ids = {}
    for step, (w, action) in enumerate(script):
        if action != "fetch":
            push_ids[step] = len(push_ids)
    owner = {j: script[step][0] for step, j in push_ids.items()}
    n = len(push_ids) + 1
    failures = []
    with ShardedParameters(comm, n, n_servers=min(2, comm.size - 1)) as store:
        me = _Worker(store, n)
        for step, (w, action) in enumerate(script):
            if comm.rank == w:
                if action == "fetch":
                    me.fetch()
                else:
                    me.push(push_ids[step], sparse=action == "sparse")
            polled_barrier(comm)
        final = store.read_all()
        version = store.version()
    if comm.rank in workers:
        for j, tau, buf, overlap in me.pushes:
            truth = _missing_others(buf, j, owner, range(j))
            if tau != truth or overlap != 0:
                failures.append(f"push {j}: tau {tau}, pushes by others missing from its fetch {truth}, "
                                f"overlap {overlap}")
    if not (np.array_equal(final[:-1], np.ones(n - 1, F32)) and version == n - 1):
        failures.append(f"store {final}, version {version}")
    agree(comm, failures)


@pytest.mark.mpi(min_size=3)
@pytest.mark.ranks(3, 6)
def test_push_delayed_between_ticket_and_data_is_counted(comm):
    """A pushes (ticket taken, data delayed); B fetches meanwhile, so A's push is missing from it; B's tau counts it.

    The landed code read the push counter before the data: B's version already counted A's ticket, and B's
    push saw tau 0 although its gradient never saw A's update.
    """
    a, b = 1, 2
    n = 4
    failures = []
    with _Hooked(comm, n, n_servers=1) as store:
        me = _Worker(store, n)
        if comm.rank in (a, b):
            me.fetch()
        polled_barrier(comm)
        if comm.rank == a:
            # Inside A's push: let step 2 (B's fetch) run between the ticket and the data.
            store.after_ticket = lambda: (polled_barrier(comm), polled_barrier(comm))
            me.push(0)        # step 1: ticket ... step 3: data lands
        else:
            polled_barrier(comm)  # end of step 1 (A holds its ticket)
            if comm.rank == b:
                me.fetch()         # step 2: A's data not there yet
            polled_barrier(comm)  # end of step 2
        polled_barrier(comm)      # end of step 3: A's push has landed
        if comm.rank == b:
            me.push(1)             # step 4
        polled_barrier(comm)
        final = store.read_all()
    if comm.rank == b:
        j, tau, buf, overlap = me.pushes[0]
        if buf[0] != 0:
            failures.append(f"the script failed: B's fetch already held A's delayed push ({buf})")
        if tau != 1:
            failures.append(f"B's push saw tau {tau}; A's push, missing from B's fetch, must count (tau 1)")
        if overlap != 1:
            failures.append(f"B's fetch overlapped A's push in flight, but fetch_overlap is {overlap}")
    if comm.rank == a and me.pushes[0][1] != 0:
        failures.append(f"A's push saw tau {me.pushes[0][1]}, expected 0")
    if not np.array_equal(final, np.array([1, 1, 0, 0], F32)):
        failures.append(f"store {final}")
    agree(comm, failures)


@pytest.mark.mpi(min_size=3)
@pytest.mark.ranks(3, 6)
def test_push_landing_during_a_fetch_over_counts_by_at_most_the_overlap(comm):
    """B reads the version, A pushes whole, B's Gets then see A's data: tau over-counts by <= fetch_overlap (1)."""
    a, b = 1, 2
    n = 4
    failures = []
    with _Hooked(comm, n, n_servers=1) as store:
        me = _Worker(store, n)
        if comm.rank in (a, b):
            me.fetch()
        polled_barrier(comm)
        if comm.rank == b:
            store.before_gets = lambda: (polled_barrier(comm), polled_barrier(comm))
            me.fetch()             # step 1: version read ... step 3: Gets
        else:
            polled_barrier(comm)
            if comm.rank == a:
                me.push(0)         # step 2: lands between B's version read and B's Gets
            polled_barrier(comm)
        polled_barrier(comm)
        if comm.rank == b:
            me.push(1)
        polled_barrier(comm)
    if comm.rank == b:
        j, tau, buf, overlap = me.pushes[0]
        truth = 0 if buf[0] == 1 else 1
        if buf[0] != 1:
            failures.append(f"the script failed: B's fetch missed A's push ({buf})")
        if not truth <= tau <= truth + overlap or overlap != 1:
            failures.append(f"tau {tau}, truth {truth}, overlap {overlap}: expected truth <= tau <= truth + 1")
    agree(comm, failures)


@pytest.mark.mpi(min_size=1)
def test_lone_worker_own_pushes_are_not_staleness(comm):
    """n_fetch 4, n_push 1 on a lone worker: tau 0 for every push, so exp:0.9 never shrinks its own updates."""
    n = 10
    worker = comm.size - 1
    taus, weights = [], []
    failures = []

    def decay(tau):
        weights.append(0.9 ** tau)
        return 0.9 ** tau

    with ShardedParameters(comm, n, n_servers=min(2, comm.size)) as store:
        if comm.rank == worker:
            buf = np.empty(n, F32)
            for step in range(12):
                if step % 4 == 0:
                    base = store.fetch(buf)
                taus.append(store.push(np.full(n, 2, F32), base_version=base, weight=decay))
        polled_barrier(comm)
        final = store.read_all()
    if comm.rank == worker and (taus != [0] * 12 or weights != [1.0] * 12):
        failures.append(f"a lone worker saw taus {taus} (weights {weights})")
    if not np.array_equal(final, np.full(n, 24, F32)):
        failures.append(f"store {final}: its own pushes were scaled down")
    agree(comm, failures)


def _downpour_workers(comm, cfg, n, steps, seeds):
    """Run DownpourWorker with integer gradients on ranks 1.. (rank 0 hosts); return (store vector, accrued sum)."""
    from asyncsgd.algorithms.downpour.worker import DownpourWorker
    from asyncsgd.backends import select_ops

    accrued = np.zeros(n)
    with ShardedParameters(comm, n, n_servers=1) as store:
        worker = None
        if comm.rank >= 1:
            net = IntegerNet(n, seeds[comm.rank])
            worker = DownpourWorker(cfg, net, store, select_ops("cpu"), seed=0)
            train_worker(worker, steps, cfg)
            accrued = -cfg.lr * net.total_grad   # what this worker's local steps added up to
        polled_barrier(comm)
        final = store.read_all()
    return final, comm.allreduce(accrued), worker


@pytest.mark.mpi(min_size=2)
@pytest.mark.ranks(2, 3, 6)
@pytest.mark.parametrize("steps", [23, 24])
def test_sparse_workers_deliver_everything_they_accrued(comm, steps):
    """--sparsity 0.01: after the last push the store holds the exact sum of every worker's accrued updates.

    The landed code's final push sent only the top 1% of accrued + residual and dropped the rest.
    """
    cfg = DownpourOptions(lr_schedule=Constant(), staleness=NoDecay(), optimizer="sgd", sparsity=0.01, momentum=0.0,
                          lr=1.0, adagrad_eps=1e-6, n_fetch=3, n_push=2)
    final, expected, worker = _downpour_workers(comm, cfg, 700, steps, seeds={r: 100 + r for r in range(comm.size)})
    failures = []
    if not np.array_equal(final, expected.astype(F32)):
        failures.append(f"store differs from the accrued sum in {np.count_nonzero(final != expected)} of 700 "
                        f"entries (max {np.abs(final - expected).max()})")
    if worker is not None and np.any(worker.residual != 0):
        failures.append("the residual was not emptied by the last push")
    agree(comm, failures)


@pytest.mark.mpi(min_size=2)
@pytest.mark.ranks(2)
def test_lone_downpour_worker_with_decay_keeps_its_updates_whole(comm):
    """A lone DownpourWorker with exp:0.9, n_fetch 4, n_push 1: every push has tau 0 and lands unscaled."""
    cfg = DownpourOptions(lr_schedule=Constant(), staleness=ExponentialDecay(0.9), optimizer="sgd", sparsity=1.0,
                          momentum=0.0, lr=1.0, adagrad_eps=1e-6, n_fetch=4, n_push=1)
    final, expected, worker = _downpour_workers(comm, cfg, 50, 12, seeds={1: 7})
    failures = []
    if not np.array_equal(final, expected.astype(F32)):
        failures.append(f"store {final[:5]}... != accrued {expected[:5]}...: own pushes were decayed")
    if worker is not None and (worker.hist[0] != worker.pushes or worker.staleness_sum != 0):
        failures.append(f"staleness histogram {worker.hist[:4]} over {worker.pushes} pushes")
    agree(comm, failures)


@pytest.mark.mpi(min_size=1)
def test_own_push_history_is_bounded_and_stays_exact(comm, monkeypatch):
    """Only the last pushes are remembered: recent bases keep tau exact, a base older than them is refused."""
    from asyncsgd.store import base
    monkeypatch.setattr(base, "_OWN_HISTORY", 2)
    n = 3
    failures = []
    with ShardedParameters(comm, n, n_servers=1) as store:
        if comm.rank == comm.size - 1:
            buf = np.empty(n, F32)
            taus = []
            for step in range(20):
                if step % 3 == 0:
                    base = store.fetch(buf)
                taus.append(store.push(np.ones(n, F32), base_version=base))
            if taus != [0] * 20:
                failures.append(f"taus {taus}")
            try:
                store.push(np.ones(n, F32), base_version=0)
                failures.append("a base older than the remembered pushes was accepted")
            except ValueError as exc:
                if "older than the last 2 pushes" not in str(exc):
                    failures.append(f"message: {exc}")
        polled_barrier(comm)
    agree(comm, failures)
