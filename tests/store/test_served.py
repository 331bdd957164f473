"""Tests of the parameter store served over two-sided messages (asyncsgd.store.served), chosen by ``open_store``.

Run serially (the rank-free tests) and under mpiexec at any size, e.g.
``mpiexec -n 4 python -m pytest --with-mpi -p no:cacheprovider tests/store/test_served.py``.  Across hosts (where
it matters: Open MPI's emulated RMA over TCP) tests/store/test_store_hosts.py runs it under Open MPI.
"""
from __future__ import annotations

import numpy as np
import pytest

from asyncsgd.runtime.mpi import polled_barrier
from asyncsgd.store import ServedParameters, ShardedParameters, open_store
from mpi_checks import agree

pytestmark = pytest.mark.timeout(120, method="thread")

F32 = np.float32


def test_open_store_rejects_an_unknown_transport(monkeypatch):
    from mpi4py import MPI
    with pytest.raises(ValueError, match="transport='udp' is not a store transport: use one of rma, messages"):
        open_store(MPI.COMM_SELF, 4, transport="udp")
    monkeypatch.setenv("ASYNCSGD_STORE", "shm")
    with pytest.raises(ValueError, match="ASYNCSGD_STORE='shm' is not a store transport"):
        open_store(MPI.COMM_SELF, 4)


@pytest.mark.mpi(min_size=1)
def test_open_store_picks_the_transport_from_argument_or_environment(comm, monkeypatch):
    monkeypatch.delenv("ASYNCSGD_STORE", raising=False)
    with open_store(comm, 5) as store:
        assert type(store) is ShardedParameters
    monkeypatch.setenv("ASYNCSGD_STORE", "messages")
    with open_store(comm, 5) as store:
        assert type(store) is ServedParameters
    with open_store(comm, 5, transport="rma") as store:
        assert type(store) is ShardedParameters


@pytest.mark.mpi(min_size=1)
def test_adagrad_is_refused(comm):
    with pytest.raises(ValueError, match="adagrad=True needs the RMA store"):
        ServedParameters(comm, 5, adagrad=True)


@pytest.mark.mpi(min_size=1)
def test_concurrent_dense_and_sparse_pushes_lose_no_update(comm):
    """Every rank pushes integer deltas (dense and sparse) concurrently; every shard holds the exact sum."""
    n, pushes = 41, 200
    n_servers = min(3, comm.size)
    initial = np.random.default_rng(3).integers(-9, 9, size=n).astype(F32)
    rng = np.random.default_rng(100 + comm.rank)
    dense = rng.integers(-3, 4, size=(pushes, n)).astype(F32)
    idx = [rng.choice(n, size=5) for _ in range(pushes)]          # repeated indices are summed
    vals = [rng.integers(-3, 4, size=5).astype(F32) for _ in range(pushes)]
    mine = dense.sum(axis=0)
    for i, v in zip(idx, vals):
        np.add.at(mine, i, v)
    expected = initial + sum(comm.allgather(mine))
    failures = []
    with ServedParameters(comm, n, n_servers=n_servers, initial=initial) as store:
        polled_barrier(comm)
        base = store.fetch(np.empty(n, F32))
        last = -1
        for k in range(pushes):
            tau = store.push(dense[k], base_version=base)
            tau = max(tau, store.push_sparse(idx[k], vals[k], base_version=base))
            if tau < last:
                failures.append(f"staleness went from {last} to {tau}")
            last = tau
        polled_barrier(comm)
        got = store.read_all()
        if not np.array_equal(got, expected):
            failures.append(f"lost updates: {got - expected}")
        if store.version() != 2 * pushes * comm.size:
            failures.append(f"version {store.version()}, expected {2 * pushes * comm.size}")
        if store.is_server:
            start, stop = store.bounds[comm.rank]
            if not np.array_equal(store.local_shard(), expected[start:stop]):
                failures.append("local_shard differs from the whole vector's piece")
            if not store.progress_running:
                failures.append("the server thread is not running")
        if store.stats()["pushes"] != 2 * pushes:
            failures.append(f"stats {store.stats()}")
    agree(comm, failures)


@pytest.mark.mpi(min_size=1)
def test_lone_worker_sees_no_staleness_and_load_replaces(comm):
    """One worker's own pushes are never stale; ``load`` overwrites every shard; free is idempotent."""
    n = 11
    failures = []
    store = ServedParameters(comm, n, n_servers=comm.size)
    if comm.rank == 0:
        v = store.fetch(np.empty(n, F32))
        taus = [store.push(np.ones(n, F32), base_version=v) for _ in range(3)]
        if taus != [0, 0, 0]:
            failures.append(f"lone worker's taus {taus}")
        store.load(np.arange(n, dtype=F32))
    polled_barrier(comm)
    if not np.array_equal(store.read_all(), np.arange(n, dtype=F32)):
        failures.append(f"after load: {store.read_all()}")
    store.free()
    store.free()
    with pytest.raises(RuntimeError, match="used after free"):
        store.fetch(np.empty(n, F32))
    agree(comm, failures)
