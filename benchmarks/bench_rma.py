"""Measure the parameter store's RMA transfers against a local memory copy, in one run.

    mpiexec -n 2 python benchmarks/bench_rma.py [--sizes 1 4 16 64] [--densities 0.01 0.1]

Rank 0 hosts one shard (a ``ShardedParameters`` with one server) and sleeps in a polled barrier, as a Downpour
server does; rank 1 is the worker and times, for each shard size:

- ``np.copyto`` of the same number of bytes (the memcpy yardstick, on the worker);
- ``fetch`` (``Get`` + ``Flush``), ``push`` (``Accumulate(SUM)`` + ``Flush``) and ``push_adagrad``
  (``Get_accumulate`` + ``Accumulate``), as bandwidth in GB/s and as ratios to memcpy;
- sparse pushes (indexed datatypes, random unsorted indices as top-k selection gives them) at each density against
  the dense push: time and bytes moved;
- the latency of a 1 MiB fetch + push + push_adagrad while the host computes in pure Python, with and without
  the host's progress thread (docs/MPI.md: MPICH blocks passive-target operations until the target
  enters MPI).

Times are the best of repeated runs (the progress latencies: max and median); the machine is shared, so
compare the ratios, not the absolute figures.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import record  # noqa: E402

from asyncsgd.runtime.mpi import polled_barrier
from asyncsgd.store import ShardedParameters, sharded

MIB = 1 << 20


def _best_time(fn, reps: int) -> float:
    """Return the shortest of ``reps`` timed calls (after one warm-up): the run least disturbed by neighbours."""
    fn()  # warm up: first touch of pages, lazy MPI setup
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _reps(nbytes: int) -> int:
    return max(5, min(50, int(256 * MIB / nbytes)))


def _prepare_sparse(store, idx, vals):
    """The worker-side CPU part of a sparse push: sort and coalesce, then build and free the index datatypes."""
    for _rank, disp, _part in store._split(*store._sparse(idx, vals)):
        sharded._indexed_type(disp)[0].Free()


def bench_size(comm, mib: int, densities) -> dict:
    """Time memcpy and every store operation on a shard of ``mib`` MiB; return the figures (worker rank only)."""
    n = mib * MIB // 4
    rng = np.random.default_rng(mib)
    row = {}
    with ShardedParameters(comm, n, n_servers=1, initial=rng.standard_normal(n).astype(np.float32),
                           adagrad=True) as store:
        if comm.rank == 1:
            reps = _reps(n * 4)
            src = rng.standard_normal(n).astype(np.float32)
            dst = np.empty_like(src)
            delta = (src * 1e-6).astype(np.float32)
            row["memcpy"] = _best_time(lambda: np.copyto(dst, src), reps)
            row["get"] = _best_time(lambda: store.fetch(dst), reps)
            row["acc"] = _best_time(lambda: store.push(delta, base_version=store.version()), reps)
            row["adagrad"] = _best_time(lambda: store.push_adagrad(delta, 1e-3, 1e-6, base_version=0), reps)
            row["sparse"] = []
            for density in densities:
                k = max(1, int(n * density))
                idx = rng.choice(n, size=k, replace=False)
                vals = rng.standard_normal(k).astype(np.float32) * 1e-6
                before = store.push_bytes
                store.push_sparse(idx, vals, base_version=0)
                nbytes = store.push_bytes - before
                t = _best_time(lambda: store.push_sparse(idx, vals, base_version=0), max(3, reps // 4))
                prep = _best_time(lambda: _prepare_sparse(store, idx, vals), max(3, reps // 4))
                row["sparse"].append((density, k, t, prep, nbytes))
        polled_barrier(comm)
    return row


def bench_progress(comm, busy_s: float = 1.5, ops: int = 20) -> dict:
    """Return the worker's max and median latency (s) of fetch + push + push_adagrad while the host computes."""
    n = MIB // 4
    result = {}
    with ShardedParameters(comm, n, n_servers=1, adagrad=True) as store:
        for label in ("progress thread", "no progress thread"):
            if label == "no progress thread" and comm.rank == 0 and store._progress is not None:
                store._progress.stop()  # benchmark only: show what the thread buys
            polled_barrier(comm)
            if comm.rank == 0:
                end, x = time.perf_counter() + busy_s, 0
                while time.perf_counter() < end:  # pure Python: holds the GIL, never enters MPI
                    x += 1
            elif comm.rank == 1:
                time.sleep(0.1)
                buf, zeros, lat = np.empty(n, np.float32), np.zeros(n, np.float32), []
                for _ in range(ops):
                    t0 = time.perf_counter()
                    v = store.fetch(buf)
                    store.push(zeros, base_version=v)
                    store.push_adagrad(zeros, 1e-3, 1e-6, base_version=v)
                    lat.append(time.perf_counter() - t0)
                result[label] = (max(lat), statistics.median(lat))
            polled_barrier(comm)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16, 64], help="shard sizes in MiB")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.1], help="sparse push densities")
    parser.add_argument("--json-out", help="rank 0 writes every figure here (docs/BENCHMARKS.md)")
    args = parser.parse_args(argv)
    load = list(os.getloadavg())
    comm = MPI.COMM_WORLD.Dup()
    if comm.size < 2:
        if comm.rank == 0:
            print("bench_rma.py needs 2 ranks: mpiexec -n 2 python benchmarks/bench_rma.py", file=sys.stderr)
        sys.exit(2)
    rows = {mib: bench_size(comm, mib, args.densities) for mib in args.sizes}
    progress = bench_progress(comm)
    rows, progress = comm.bcast((rows, progress), root=1)
    if comm.rank != 0:
        return
    print(f"{MPI.Get_library_version().splitlines()[0].strip()}; {comm.size} ranks; shard on rank 0, worker rank 1")
    print(f"{'MiB':>5} {'memcpy GB/s':>11} {'Get GB/s':>9} {'Get/mcp':>8} {'Acc GB/s':>9} {'Acc/mcp':>8} "
          f"{'Adagrad ms':>10} {'Adagrad/Acc':>11}")
    for mib, r in rows.items():
        gbs = {key: mib * MIB / r[key] / 1e9 for key in ("memcpy", "get", "acc")}
        print(f"{mib:>5} {gbs['memcpy']:>11.2f} {gbs['get']:>9.2f} {gbs['get'] / gbs['memcpy']:>8.2f} "
              f"{gbs['acc']:>9.2f} {gbs['acc'] / gbs['memcpy']:>8.2f} {r['adagrad'] * 1e3:>10.2f} "
              f"{r['adagrad'] / r['acc']:>11.2f}")
    print()
    print(f"{'MiB':>5} {'density':>8} {'entries':>9} {'sparse ms':>10} {'of it prep':>10} {'dense ms':>9} "
          f"{'time ratio':>10} {'sparse MB':>10} {'dense MB':>9} {'bytes ratio':>11}")
    for mib, r in rows.items():
        for density, k, t, prep, nbytes in r["sparse"]:
            print(f"{mib:>5} {density:>8.3f} {k:>9} {t * 1e3:>10.3f} {prep * 1e3:>10.3f} {r['acc'] * 1e3:>9.3f} "
                  f"{t / r['acc']:>10.3f} {nbytes / 1e6:>10.3f} {mib * MIB / 1e6:>9.3f} {nbytes / (mib * MIB):>11.3f}")
    print("(prep: sorting the indices and building the indexed datatype on the worker's CPU)")
    print()
    print("1 MiB fetch + push + push_adagrad while the host computes in pure Python (max / median latency):")
    for label, (worst, median) in progress.items():
        print(f"  {label:<20} {worst * 1e3:8.2f} ms / {median * 1e3:6.2f} ms")
    record.write(args.json_out, {"seconds_by_shard_mib": rows, "progress_latency_max_median_s": progress},
                 started_load=load)
    comm.Free()


if __name__ == "__main__":
    main()
