"""Tests of the Downpour parameter store (asyncsgd.store) over MPI RMA windows.

Run serially (plain ``pytest``: only the rank-free tests) and under mpiexec at any size, e.g.
``mpiexec -n 6 python -m pytest --with-mpi -p no:cacheprovider tests/store/test_sharded.py``.  Multi-rank tests gather every
rank's findings before asserting (``_agree``), so a failure on one rank fails all of them instead of hanging them.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from asyncsgd.runtime.mpi import polled_barrier
from asyncsgd.store import ShardedParameters, base, shard_bounds
from mpi_checks import agree
from store_checks import COUNTERS, read_faults

pytestmark = pytest.mark.timeout(120, method="thread")

F32 = np.float32


def _check(failures, condition, message):
    if not condition:
        failures.append(message)


def _bits(a):
    return np.ascontiguousarray(a, dtype=F32).view(np.uint32)


# ------------------------------------------------------------------ shard bounds (no MPI traffic)

@pytest.mark.parametrize("n_params,n_servers", [(1, 1), (10, 1), (10, 3), (31, 3), (7, 7), (100003, 6)])
def test_shard_bounds_are_contiguous_and_balanced(n_params, n_servers):
    bounds = shard_bounds(n_params, n_servers)
    assert len(bounds) == n_servers
    assert bounds[0][0] == 0 and bounds[-1][1] == n_params
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [stop - start for start, stop in bounds]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("n_params,n_servers,match", [(10, 0, "n_servers must be >= 1"),
                                                      (3, 4, "more shards than parameters"),
                                                      (0, 1, "n_params must be >= 1"),
                                                      (10, 1.5, "n_servers must be an integer")])
def test_shard_bounds_rejects_bad_sizes(n_params, n_servers, match):
    with pytest.raises(ValueError, match=match):
        shard_bounds(n_params, n_servers)


# ------------------------------------------------------------------ construction, validation, lifetime

@pytest.mark.mpi(min_size=1)
def test_constructor_rejects_bad_arguments(comm):
    with pytest.raises(ValueError, match="n_servers must be >= 1"):
        ShardedParameters(comm, 10, n_servers=0)
    with pytest.raises(ValueError, match="exceeds the communicator"):
        ShardedParameters(comm, 10, n_servers=comm.size + 1)
    with pytest.raises(ValueError, match="n_params must be >= 1"):
        ShardedParameters(comm, 0)
    with pytest.raises(ValueError, match="must be an integer"):
        ShardedParameters(comm, 10.0)
    with pytest.raises(ValueError, match="shape"):
        ShardedParameters(comm, 10, initial=np.zeros(9, F32))
    with pytest.raises(ValueError, match="float vector"):
        ShardedParameters(comm, 10, initial=np.zeros(10, np.int32))
    with pytest.raises(ValueError, match="too big for MPI's int displacements"):
        ShardedParameters(comm, 2 ** 31, n_servers=1)  # rejected before anything is allocated
    if comm.size >= 2:
        with pytest.raises(ValueError, match="more shards than parameters"):
            ShardedParameters(comm, 1, n_servers=2)


@pytest.mark.mpi(min_size=1)
def test_bad_buffers_raise_before_any_transfer(comm):
    n = 12
    with ShardedParameters(comm, n, n_servers=1) as store:
        out = np.empty(n, F32)
        v = store.fetch(out)
        bad_calls = {
            "fetch float64": lambda: store.fetch(np.empty(n, np.float64)),
            "fetch short": lambda: store.fetch(np.empty(n - 1, F32)),
            "fetch strided": lambda: store.fetch(np.empty(2 * n, F32)[::2]),
            "fetch list": lambda: store.fetch([0.0] * n),
            "fetch read-only": lambda: store.fetch(np.frombuffer(bytes(4 * n), dtype=F32)),
            "push float64": lambda: store.push(np.zeros(n), base_version=v),
            "push 2-D": lambda: store.push(np.zeros((1, n), F32), base_version=v),
            "push negative base": lambda: store.push(np.zeros(n, F32), base_version=-1),
            "push float base": lambda: store.push(np.zeros(n, F32), base_version=0.0),
            "sparse idx < 0": lambda: store.push_sparse(np.array([-1]), np.ones(1, F32), base_version=v),
            "sparse idx >= n": lambda: store.push_sparse(np.array([n]), np.ones(1, F32), base_version=v),
            "sparse float idx": lambda: store.push_sparse(np.array([1.0]), np.ones(1, F32), base_version=v),
            "sparse 2-D idx": lambda: store.push_sparse(np.array([[1]]), np.ones((1, 1), F32), base_version=v),
            "sparse length": lambda: store.push_sparse(np.array([1, 2]), np.ones(3, F32), base_version=v),
            "sparse vals dtype": lambda: store.push_sparse(np.array([1]), np.ones(1), base_version=v),
            "adagrad off": lambda: store.push_adagrad(np.zeros(n, F32), 0.1, 1e-6, base_version=v),
            "adagrad sparse off": lambda: store.push_adagrad_sparse(np.array([1]), np.ones(1, F32), 0.1, 1e-6,
                                                                    base_version=v),
            "sums off": store.adagrad_sums,
            "load sums off": lambda: store.load(np.zeros(n, F32), adagrad_sums=np.zeros(n, F32)),
            "load shape": lambda: store.load(np.zeros(n + 1, F32)),
        }
        failures = []
        for name, call in bad_calls.items():
            try:
                call()
                failures.append(f"{name}: no ValueError")
            except ValueError:
                pass
        polled_barrier(comm)
        _check(failures, store.version() == 0, f"rejected calls moved the counter to {store.version()}")
        _check(failures, store.pushes == 0 and store.push_bytes == 0, f"stats counted rejected calls: "
                                                                      f"{store.stats()}")
        polled_barrier(comm)
        # A base version from the future is only detectable after taking the ticket: it still raises.
        try:
            store.push(np.zeros(n, F32), base_version=10 ** 9)
            failures.append("future base_version accepted")
        except ValueError as exc:
            _check(failures, "newer than the store's version" in str(exc), f"unexpected message: {exc}")
    agree(comm, failures)


@pytest.mark.mpi(min_size=1)
def test_free_is_idempotent_and_use_after_free_raises(comm):
    n = 9
    store = ShardedParameters(comm, n, n_servers=min(2, comm.size), adagrad=True)
    failures = []
    hosting_with_peers = store.is_server and comm.size > 1
    _check(failures, store.progress_running == hosting_with_peers,
           f"progress thread running={store.progress_running}, expected {hosting_with_peers}")
    store.free()
    store.free()
    _check(failures, not store.progress_running, "progress thread still running after free()")
    uses = {
        "fetch": lambda: store.fetch(np.empty(n, F32)),
        "push": lambda: store.push(np.zeros(n, F32), base_version=0),
        "push_sparse": lambda: store.push_sparse(np.array([1]), np.ones(1, F32), base_version=0),
        "push_adagrad": lambda: store.push_adagrad(np.zeros(n, F32), 0.1, 1e-6, base_version=0),
        "push_adagrad_sparse": lambda: store.push_adagrad_sparse(np.array([1]), np.ones(1, F32), 0.1, 1e-6,
                                                                 base_version=0),
        "version": store.version, "read_all": store.read_all, "adagrad_sums": store.adagrad_sums,
        "load": lambda: store.load(np.zeros(n, F32)), "enter": store.__enter__,
    }
    for name, use in uses.items():
        try:
            use()
            failures.append(f"{name} after free() did not raise")
        except RuntimeError as exc:
            _check(failures, "ShardedParameters used after free()" in str(exc), f"{name}: message {exc}")
    with ShardedParameters(comm, n) as scoped:
        pass
    try:
        scoped.read_all()
        failures.append("store still usable after its with block")
    except RuntimeError:
        pass
    # An exception leaves the block at once (no collective free() that could hang); free() stays possible.
    with pytest.raises(KeyError):
        with ShardedParameters(comm, n, n_servers=comm.size) as raising:
            raise KeyError("boom")
    _check(failures, not raising.progress_running, "progress thread survived an exception")
    raising.free()
    agree(comm, failures)


# ------------------------------------------------------------------ correctness of the operations

@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("n_servers", [1, 2, 3])
def test_shards_fetch_and_push_across_boundaries(comm, n_servers):
    if n_servers > comm.size:
        pytest.skip(f"{n_servers} servers need {n_servers} ranks")
    n = 31
    initial = np.arange(n, dtype=F32) * 3 - 40
    failures = []
    with ShardedParameters(comm, n, n_servers=n_servers, initial=initial) as store:
        _check(failures, store.bounds == shard_bounds(n, n_servers), f"bounds {store.bounds}")
        out = np.full(n, np.nan, F32)
        v = store.fetch(out)
        _check(failures, np.array_equal(_bits(out), _bits(initial)), f"fetch {out} != initial")
        _check(failures, v == 0, f"first version {v}")
        polled_barrier(comm)
        # Every rank pushes position-dependent values (a misplaced element shows) plus entries on each boundary.
        r = comm.rank + 1
        store.push(np.arange(n, dtype=F32) * r, base_version=v)
        edges = sorted({i for start, _ in store.bounds for i in (start - 1, start) if 0 <= i < n} | {n - 1})
        edge_idx = np.array(edges[::-1])  # unsorted on purpose
        store.push_sparse(edge_idx, (edge_idx + 100).astype(F32) * r, base_version=v)
        polled_barrier(comm)
        total = sum(range(1, comm.size + 1))
        expected = initial + np.arange(n, dtype=F32) * total
        expected[edge_idx] += (edge_idx + 100).astype(F32) * total
        got = store.read_all()
        _check(failures, np.array_equal(got, expected), f"after pushes {got} != {expected}")
        _check(failures, store.version() == 2 * comm.size, f"version {store.version()}")
    agree(comm, failures)


@pytest.mark.mpi(min_size=1)
def test_concurrent_pushes_lose_no_update(comm):
    """size-1 workers (at least 1) push 2,000 integer-valued deltas each at once; the store holds the exact sum."""
    n, n_pushes = 37, 2000
    n_servers = min(2, comm.size)
    workers = list(range(1, comm.size)) or [0]
    deltas = {w: np.random.default_rng(1000 + w).integers(-3, 4, size=(n_pushes, n)).astype(F32) for w in workers}
    for d in deltas.values():
        d[:, COUNTERS] = 1  # every push adds 1 there: a fetch's version bounds what it may read (read_faults)
    initial = np.random.default_rng(7).integers(-50, 50, size=n).astype(F32)
    expected = initial + sum(d.sum(axis=0) for d in deltas.values())
    failures = []
    with ShardedParameters(comm, n, n_servers=n_servers, initial=initial) as store:
        polled_barrier(comm)
        start = time.monotonic()
        if comm.rank in workers:
            base = store.fetch(np.empty(n, F32))
            last_tau = -1
            for delta in deltas[comm.rank]:
                tau = store.push(delta, base_version=base)
                # only the other workers' pushes count: tau never decreases, and stays 0 for a lone worker
                _check(failures, tau >= last_tau and (tau == 0 or len(workers) > 1),
                       f"staleness went from {last_tau} to {tau}")
                last_tau = tau
            _check(failures, store.stats() == {"pushes": n_pushes, "push_bytes": n_pushes * n * 4, "fetches": 1},
                   f"stats {store.stats()}")
        else:
            # The idle host reads while others push: every push counted in a fetch's version is wholly inside it, and
            # no push that had not started when the reads ended (a torn read mixing two versions fails this).
            out = np.empty(n, F32)
            total = n_pushes * len(workers)
            while (version := store.fetch(out)) < total and time.monotonic() - start < 60:
                for fault in read_faults(out, initial, version, store.fetch_overlap):
                    failures.append(f"torn read: {fault}")
                time.sleep(0.005)
        polled_barrier(comm)
        elapsed = time.monotonic() - start
        got = store.read_all()
        _check(failures, np.array_equal(got, expected), f"lost updates: {got - expected}")
        _check(failures, store.version() == n_pushes * len(workers), f"version {store.version()}")
    if comm.rank == 0:
        print(f"{len(workers)} x {n_pushes} pushes on {comm.size} ranks: {elapsed:.2f} s")
    agree(comm, failures)


@pytest.mark.mpi(min_size=1)
def test_sparse_push_changes_exactly_the_chosen_entries(comm):
    n = 50
    initial = np.random.default_rng(3).standard_normal(n).astype(F32)
    pusher = comm.size - 1
    failures = []
    with ShardedParameters(comm, n, n_servers=min(3, comm.size), initial=initial) as store:
        expected = initial.copy()
        steps = [
            (np.array([49, 0, 16, 17, 33, 34, 8]), np.random.default_rng(4).standard_normal(7).astype(F32)),
            (np.arange(10, 30), np.random.default_rng(5).standard_normal(20).astype(F32)),  # block-sparse run
            (np.array([3, 3, 7, 3], dtype=np.int32), np.array([1, 2, 4, 8], F32)),         # repeated indices
            (np.array([], dtype=np.int64), np.array([], F32)),
        ]
        for idx, vals in steps:
            if comm.rank == pusher:
                store.push_sparse(idx, vals, base_version=0)
            polled_barrier(comm)
            np.add.at(expected, idx, vals)
            got = store.read_all()
            _check(failures, np.array_equal(_bits(got), _bits(expected)),
                   f"after pushing {idx.tolist()}: entries {np.flatnonzero(_bits(got) != _bits(expected))} differ")
            polled_barrier(comm)
    agree(comm, failures)


@pytest.mark.mpi(min_size=1)
def test_sparse_push_bytes_count_values_and_indices(comm):
    failures = []
    with ShardedParameters(comm, 40, n_servers=1) as store:
        if comm.rank == 0:
            store.push_sparse(np.array([0, 2, 4]), np.ones(3, F32), base_version=0)  # scattered: value + index
            _check(failures, store.push_bytes == 3 * 4 + 3 * 4, f"scattered bytes {store.push_bytes}")
            store.push_sparse(np.arange(10, 30), np.ones(20, F32), base_version=0)  # one run: values + 2 ints
            _check(failures, store.push_bytes == 24 + 20 * 4 + 8, f"run bytes {store.push_bytes}")
            _check(failures, store.pushes == 2, f"pushes {store.pushes}")
        polled_barrier(comm)
    agree(comm, failures)


def _serial_adagrad(params, sums, idx, g, lr, eps):
    """The reference Adagrad update, in float64: sums[idx] += g^2; params[idx] -= lr g / sqrt(sums[idx] + eps)."""
    sums[idx] += g.astype(np.float64) ** 2
    params[idx] -= lr * g / np.sqrt(sums[idx] + eps)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_one_worker_adagrad_equals_serial_adagrad(comm, sparse):
    n, steps, lr, eps = 40, 25, 0.1, 1e-6
    rng = np.random.default_rng(11)
    initial = rng.standard_normal(n).astype(F32)
    target = rng.standard_normal(n).astype(F32)
    worker = comm.size - 1
    failures = []
    with ShardedParameters(comm, n, n_servers=min(2, comm.size), initial=initial, adagrad=True) as store:
        ref_p, ref_s = initial.astype(np.float64), np.zeros(n)
        touched = np.zeros(n, bool)
        if comm.rank == worker:
            p = np.empty(n, F32)
            for step in range(steps):
                v = store.fetch(p)
                grad = (p - target) * F32(1 + step % 3)
                if sparse:
                    idx = np.random.default_rng(step).permutation(n - 8)[:10]  # the last 8 stay untouched
                    tau = store.push_adagrad_sparse(idx, grad[idx], lr, eps, base_version=v)
                    _serial_adagrad(ref_p, ref_s, idx, grad[idx], lr, eps)
                    touched[idx] = True
                else:
                    tau = store.push_adagrad(grad, lr, eps, base_version=v)
                    _serial_adagrad(ref_p, ref_s, np.arange(n), grad, lr, eps)
                _check(failures, tau == 0, f"a lone worker saw staleness {tau}")
            got_p, got_s = store.read_all(), store.adagrad_sums()
            _check(failures, np.allclose(got_p, ref_p, rtol=1e-5, atol=1e-6),
                   f"params differ by {np.abs(got_p - ref_p).max()}")
            _check(failures, np.allclose(got_s, ref_s, rtol=1e-5, atol=1e-7),
                   f"sums differ by {np.abs(got_s - ref_s).max()}")
            if sparse:
                _check(failures, not touched.all(), "test needs untouched entries")
                _check(failures, np.array_equal(_bits(got_p[~touched]), _bits(initial[~touched])),
                       "untouched parameters changed")
                _check(failures, np.all(got_s[~touched] == 0), "untouched sums changed")
            _check(failures, store.push_bytes > 0 and store.pushes == steps, f"stats {store.stats()}")
        polled_barrier(comm)
    agree(comm, failures)


@pytest.mark.mpi(min_size=2)
def test_staleness_of_a_scripted_interleaving_is_exact(comm):
    """w1 fetches; w2 fetches and pushes twice; w1 pushes (tau 2); w2 pushes with its old base (tau 1: its own
    two pushes do not count), ..."""
    n = 6
    w1, w2 = 0, 1
    taus = {}
    with ShardedParameters(comm, n, n_servers=1, adagrad=True) as store:
        buf = np.empty(n, F32)
        one = np.ones(n, F32)
        def w1_fetch():
            taus["v1"] = store.fetch(buf)

        def w2_fetch_push_push():
            taus["v2"] = store.fetch(buf)
            taus["a"] = store.push(one, base_version=taus["v2"])
            taus["b"] = store.push(one, base_version=taus["v2"])

        def w1_push():
            taus["c"] = store.push(one, base_version=taus["v1"])

        def w2_sparse_fetch_push():
            taus["d"] = store.push_sparse(np.array([2]), one[:1], base_version=taus["v2"])
            taus["v3"] = store.fetch(buf)
            taus["e"] = store.push(one, base_version=taus["v3"])

        def w1_adagrad():
            taus["f"] = store.push_adagrad(one, 0.1, 1e-6, base_version=taus["v1"])
            taus["g"] = store.push_adagrad_sparse(np.array([0]), one[:1], 0.1, 1e-6, base_version=taus["v1"])

        script = [(w1, w1_fetch), (w2, w2_fetch_push_push), (w1, w1_push), (w2, w2_sparse_fetch_push),
                  (w1, w1_adagrad)]
        for actor, act in script:
            if comm.rank == actor:
                act()
            polled_barrier(comm)
        final_version = store.version()
    expected = {w1: {"v1": 0, "c": 2, "f": 4, "g": 4}, w2: {"v2": 0, "a": 0, "b": 0, "d": 1, "v3": 4, "e": 0}}
    failures = []
    if comm.rank in expected:
        _check(failures, taus == expected[comm.rank], f"taus {taus} != {expected[comm.rank]}")
    _check(failures, final_version == 7, f"final version {final_version}")
    agree(comm, failures)


@pytest.mark.mpi(min_size=1)
def test_weight_of_staleness_scales_every_kind_of_push(comm):
    n, eps = 8, 1e-12
    pusher = comm.size - 1
    seen = []

    def halve(tau):  # a lone pusher's taus are all 0 (its own pushes never count): halve every push
        seen.append(tau)
        return 0.5 * 0.5 ** tau

    failures = []
    with ShardedParameters(comm, n, n_servers=min(2, comm.size), adagrad=True) as store:
        if comm.rank == pusher:
            v = store.fetch(np.empty(n, F32))
            store.push(np.full(n, 4, F32), base_version=v, weight=halve)                      # +2
            store.push(np.full(n, 4, F32), base_version=v, weight=halve)                      # +2
            store.push_sparse(np.array([2, 5]), np.full(2, 8, F32), base_version=v, weight=halve)  # +4
            store.push_adagrad(np.ones(n, F32), 1.0, eps, base_version=v, weight=halve)      # -1/2
            store.push_adagrad_sparse(np.array([7]), np.ones(1, F32), 1.0, eps, base_version=v,
                                      weight=halve)                                           # -1/2/sqrt2
        polled_barrier(comm)
        params, sums = store.read_all(), store.adagrad_sums()
    expected = np.full(n, 4 - 0.5)
    expected[[2, 5]] += 4
    expected[7] -= 0.5 / np.sqrt(2)
    _check(failures, np.allclose(params, expected, rtol=1e-6), f"params {params} != {expected}")
    exp_sums = np.ones(n)
    exp_sums[7] = 2
    _check(failures, np.array_equal(sums, exp_sums), f"sums {sums} (weights must not scale the sums)")
    if comm.rank == pusher:
        _check(failures, seen == [0, 0, 0, 0, 0], f"weight saw taus {seen}")
    agree(comm, failures)


@pytest.mark.mpi(min_size=1)
def test_adagrad_push_at_rate_zero_moves_nothing_but_counts(comm):
    """A decaying schedule ends at lr 0 (the default cosine); Downpour with --optimizer adagrad once died there
    (ValueError on the last pushes of 5 workers on FSDD).  Rate 0: parameters unchanged, squares summed, the push
    counted; a negative or non-finite rate is still refused."""
    n = 12
    failures = []
    with ShardedParameters(comm, n, n_servers=min(2, comm.size), initial=np.ones(n, F32), adagrad=True) as store:
        if comm.rank == comm.size - 1:
            v = store.fetch(np.empty(n, F32))
            store.push_adagrad(np.full(n, 2, F32), 0.0, 1e-6, base_version=v)
            store.push_adagrad_sparse(np.array([3]), np.full(1, 2, F32), 0.0, 1e-6, base_version=v)
            for bad in (-0.1, float("nan"), float("inf")):
                try:
                    store.push_adagrad(np.ones(n, F32), bad, 1e-6, base_version=v)
                    failures.append(f"lr {bad} accepted")
                except ValueError as err:
                    _check(failures, "lr must be a finite number >= 0" in str(err), str(err))
        polled_barrier(comm)
        params, sums, version = store.read_all(), store.adagrad_sums(), store.version()
    _check(failures, np.array_equal(params, np.ones(n)), f"params {params} moved at lr 0")
    exp_sums = np.full(n, 4.0)
    exp_sums[3] = 8
    _check(failures, np.array_equal(sums, exp_sums), f"sums {sums} != {exp_sums}")
    _check(failures, version == 2, f"version {version}: both rate-0 pushes must count")
    agree(comm, failures)


@pytest.mark.mpi(min_size=1)
def test_load_overwrites_parameters_and_sums(comm):
    n = 20
    params = np.linspace(-1, 1, n)                      # float64 on purpose: load casts to float32
    sums = np.arange(n, dtype=F32)
    failures = []
    with ShardedParameters(comm, n, n_servers=min(3, comm.size), initial=np.ones(n, F32), adagrad=True) as store:
        if comm.rank == 0:
            store.push_adagrad(np.ones(n, F32), 0.1, 1e-6, base_version=0)
            store.load(params, adagrad_sums=sums)
        polled_barrier(comm)
        _check(failures, np.array_equal(store.read_all(), params.astype(F32)), "parameters not loaded")
        _check(failures, np.array_equal(store.adagrad_sums(), sums), "sums not loaded")
        polled_barrier(comm)
        if comm.rank == 0:
            store.load(params[::-1].copy())
        polled_barrier(comm)
        _check(failures, np.array_equal(store.read_all(), params[::-1].astype(F32)), "second load lost")
        _check(failures, np.array_equal(store.adagrad_sums(), sums), "load(params) alone changed the sums")
    agree(comm, failures)


@pytest.mark.mpi(min_size=1)
def test_transfers_split_into_chunks_give_the_same_result(comm, monkeypatch):
    """Shrink the per-call element limit so every shard and index list goes in several MPI calls."""
    monkeypatch.setattr(base, "MAX_COUNT", 4)
    n, lr, eps = 23, 0.5, 1e-6
    rng = np.random.default_rng(21)
    initial = rng.integers(-9, 9, n).astype(F32)
    delta = rng.integers(-9, 9, n).astype(F32)
    idx = rng.permutation(n)[:13]
    vals = rng.integers(-9, 9, 13).astype(F32)
    grad = rng.standard_normal(n).astype(F32)
    failures = []
    with ShardedParameters(comm, n, n_servers=min(2, comm.size), initial=initial, adagrad=True) as store:
        out = np.empty(n, F32)
        store.fetch(out)
        _check(failures, np.array_equal(out, initial), "chunked fetch")
        polled_barrier(comm)
        if comm.rank == 0:
            store.push(delta, base_version=0)
            store.push_sparse(idx, vals, base_version=0)
        polled_barrier(comm)
        expected = initial + delta
        expected[idx] += vals
        _check(failures, np.array_equal(store.read_all(), expected), "chunked dense/sparse push")
        polled_barrier(comm)
        if comm.rank == 0:
            store.push_adagrad(grad, lr, eps, base_version=0)
            store.push_adagrad_sparse(idx, grad[idx], lr, eps, base_version=0)
        polled_barrier(comm)
        ref_p, ref_s = expected.astype(np.float64), np.zeros(n)
        _serial_adagrad(ref_p, ref_s, np.arange(n), grad, lr, eps)
        _serial_adagrad(ref_p, ref_s, idx, grad[idx], lr, eps)
        _check(failures, np.allclose(store.read_all(), ref_p, rtol=1e-5, atol=1e-6), "chunked Adagrad params")
        _check(failures, np.allclose(store.adagrad_sums(), ref_s, rtol=1e-5), "chunked Adagrad sums")
    agree(comm, failures)


@pytest.mark.mpi(min_size=1)
def test_polled_transfers_lose_no_update(comm):
    """With ``poll_s`` (request-based operations tested between sleeps, as under --overlap), concurrent dense and
    block-sparse pushes from every worker still sum exactly, and a fetch reads every landed push whole."""
    n, n_pushes = 301, 200
    n_servers = min(3, comm.size)
    workers = list(range(1, comm.size)) or [0]
    rng = np.random.default_rng(50 + comm.rank)
    failures = []
    with ShardedParameters(comm, n, n_servers=n_servers) as store:
        store.poll_s = 0.0001
        total = np.zeros(n, F32)
        polled_barrier(comm)
        if comm.rank in workers:
            out = np.empty(n, F32)
            for i in range(n_pushes):
                base = store.fetch(out)
                _check(failures, np.array_equal(out, np.round(out)), f"torn read {out}")
                if i % 2:
                    delta = rng.integers(-3, 4, n).astype(F32)
                    store.push(delta, base_version=base)
                    total += delta
                else:
                    idx = np.concatenate([np.arange(b * 8, min(n, b * 8 + 8)) for b in rng.choice(38, 5, False)])
                    vals = rng.integers(-3, 4, idx.size).astype(F32)
                    store.push_sparse(idx, vals, base_version=base)
                    np.add.at(total, idx, vals)
        expected = np.zeros(n, F32)
        comm.Allreduce(total, expected)
        polled_barrier(comm)
        got = np.empty(n, F32)
        version = store.fetch(got)
        _check(failures, np.array_equal(got, expected), f"lost updates at {np.flatnonzero(got != expected)[:10]}")
        _check(failures, version == n_pushes * len(workers), f"version {version}")
    agree(comm, failures)
