"""Sandblaster iteration time with a straggler: dynamic mini-shards with backups vs a static split vs no straggler.

Run under MPI (every rank is a replica):

    mpiexec -n 6 python benchmarks/bench_sandblaster.py [--model logreg] [--data fsdd] [--iters 5] [--repeats 3]

Three configurations of the same full-batch L-BFGS run (same iterates, so the same work per iteration):
(a) dynamic mini-shards with backups and one rank FACTOR x slower, (b) a static even split with the same slow rank,
(c) dynamic with no slow rank.  The slow rank sleeps (FACTOR-1) x its compute time after each mini-shard (the
test/benchmark-only --slow-ranks option).  Runs are interleaved a, b, c, a, b, c, ... and the medians of the seconds
per function evaluation are compared, because these machines are shared and noisy.  Prints the ratios (a)/(c) and
(b)/(c): a perfect load balancer keeps (a)/(c) near 1 + the lost share of the slow rank's capacity, a static split
makes (b)/(c) approach FACTOR.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

# One BLAS thread per rank: with more ranks than cores, OpenBLAS's own threads oversubscribe the machine further
# (set before numpy is imported; an explicit setting in the environment wins).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from mpi4py import MPI  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import record  # noqa: E402
from asyncsgd import SandblasterOptions, Stop, prepare  # noqa: E402
from asyncsgd.data import open_source  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="logreg", choices=("logreg", "speech_cnn", "mnist_cnn"))
    p.add_argument("--data", default="fsdd")
    p.add_argument("--batch-size", type=int, default=None, help="L-BFGS batch (default: the mode's default)")
    p.add_argument("--iters", type=int, default=5, help="L-BFGS iterations per run")
    p.add_argument("--repeats", type=int, default=3, help="runs of each configuration")
    p.add_argument("--factor", type=float, default=4.0, help="how many times slower the slow rank is")
    p.add_argument("--json-out", help="rank 0 writes every run and the medians here (docs/BENCHMARKS.md)")
    args = p.parse_args(argv)
    comm = MPI.COMM_WORLD
    if comm.size < 2:
        sys.exit("run under mpiexec with at least 2 ranks, e.g. mpiexec -n 6 python benchmarks/bench_sandblaster.py")
    src = open_source(args.data)
    load = list(os.getloadavg())
    slow = {comm.size - 1: args.factor}
    configs = {"a": ("dynamic", slow), "b": ("static", slow), "c": ("dynamic", {})}
    per_eval = {k: [] for k in configs}
    info = {}
    for rep in range(args.repeats):
        for key, (schedule, slow_ranks) in configs.items():
            opts = SandblasterOptions(max_iter=args.iters, grad_tol=0, loss_tol=0, batch_size=args.batch_size,
                                      schedule=schedule, slow_ranks=slow_ranks)
            result = prepare("sandblaster", args.model, src, opts, Stop(), comm=comm).execute()
            if comm.rank == 0:
                summary = result.summary
                per_eval[key].append(summary["wall_s"] / summary["function_evaluations"])
                info[key] = summary
                print(f"run {rep} ({key}) {schedule:7s} slow={','.join(f'{r}:{f:g}' for r, f in slow_ranks.items()) or '-':6s} "
                      f"{summary['iterations']} it, {summary['function_evaluations']} evals, "
                      f"{summary['wall_s']:.2f} s, backups {summary['backups_launched']} launched / "
                      f"{summary['backups_discarded']} discarded / {summary['stragglers_beaten']} beat the straggler",
                      flush=True)
    if comm.rank == 0:
        med = {k: statistics.median(v) for k, v in per_eval.items()}
        s = info["a"]
        print(f"\n{comm.size} ranks, model {args.model}, batch {s['batch_size']}, mini-shard {s['mini_shard_size']}, "
              f"slow rank {comm.size - 1} x{args.factor}")
        for k, label in (("a", "dynamic + backups, slow rank"), ("b", "static split, slow rank"),
                         ("c", "dynamic, no slow rank")):
            print(f"({k}) {label:30s} {med[k] * 1000:8.1f} ms per evaluation (median of {len(per_eval[k])})")
        print(f"ratio (a)/(c) = {med['a'] / med['c']:.2f}")
        print(f"ratio (b)/(c) = {med['b'] / med['c']:.2f}")
        record.write(args.json_out, {"ranks": comm.size, "model": args.model, "slow_rank": comm.size - 1,
                                     "factor": args.factor, "seconds_per_evaluation": per_eval,
                                     "median_s": med, "ratio_a_c": med["a"] / med["c"],
                                     "ratio_b_c": med["b"] / med["c"]}, started_load=load)


if __name__ == "__main__":
    main()
