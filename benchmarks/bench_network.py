"""What the network costs the parameter store: fetch and push times between two hosts at 1 and 10 Gbit/s.

    sudo python benchmarks/bench_network.py [--rates 1gbit 10gbit] [--delay 100us] [--sizes speech_cnn 25000000]
                                            [--blocks 1 32] [--only ops,step] [--step-rates 1gbit]

Builds two hosts on this machine (tests/support/hosts.py: network namespaces on a bridge, ``tc tbf`` link limits, MPI over
TCP between them; needs root and iproute2), puts the store's one server rank on host0 and one worker rank on host1,
so every byte crosses a limited link, and measures, for each link rate:

- ``ops``, for each vector size: ``fetch`` (``Get`` of the whole vector) and a dense ``push`` (``Accumulate(SUM)``);
  sparse pushes (``push_sparse``) at 1% and 10% density, building the datatype included, as ratios to the dense
  push measured in the same run, for each selection of ``--blocks``: 1 = scattered entries (random unsorted indices,
  as element top-k gives them), B = whole blocks of B entries (``select_topk_blocks`` of a random vector, as
  ``--sparse-block B`` gives them); and the same with no link limit (veth at memory speed) as the yardstick;
- ``step``: a ``speech_cnn`` DownpourWorker's step (batch 32) without communication, with fetch + push inline every
  step, and with ``--overlap push`` / ``all`` (dense; sparse 1% of blocks, inline, push and all), as ratios to the step without
  communication.

Sizes: ``speech_cnn`` (its parameter count, about 0.66M) and a synthetic 25M-parameter vector.  Latency is added
with netem (``--delay``, one-way, on what each host sends) when the kernel has it; without netem the table says
so.  The MPI is the one mpi4py loads in this interpreter (or ``--python``); MPICH uses libfabric's tcp provider
between hosts.  Times are medians of repeated runs; the machine is shared, so compare the ratios.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "support"))
sys.path.insert(0, ROOT)

DENSITIES = (0.01, 0.10)


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _reps(nbytes: int, budget_s: float, per_byte_s: float) -> int:
    """Repetitions that fit ``budget_s`` at roughly ``per_byte_s`` (bounded 3..20)."""
    return max(3, min(20, int(budget_s / max(nbytes * per_byte_s, 1e-6))))


def _sparse_indices(rng, n: int, density: float, block: int):
    """Indices as the trainer's selection gives them: top-k of a random vector, single entries or whole blocks."""
    import numpy as np

    from asyncsgd.backends.sparse import select_topk_blocks

    if block == 1:
        return rng.choice(n, max(1, int(density * n)), replace=False)  # unsorted, as top-k gives them
    accrued = rng.standard_normal(n).astype(np.float32)
    idx, _ = select_topk_blocks(accrued, density, np.zeros(n, np.float32), block)
    return idx


def rank_program(sizes: list, budget_s: float, blocks: list):
    """Rank 0 serves the whole vector; rank 1 times fetch, dense and sparse pushes; rank 1 prints RESULT json."""
    import numpy as np
    from mpi4py import MPI

    from asyncsgd.runtime.mpi import polled_barrier
    from asyncsgd.store import open_store  # ASYNCSGD_STORE (tests/support/hosts.py: messages under Open MPI)

    comm = MPI.COMM_WORLD
    results = []
    for n in sizes:
        with open_store(comm, n, n_servers=1) as store:
            polled_barrier(comm)
            if comm.rank == 1:
                rng = np.random.default_rng(0)
                out = np.empty(n, np.float32)
                delta = rng.standard_normal(n).astype(np.float32) * np.float32(1e-6)
                store.fetch(out)                                         # connect and warm up
                first = time.perf_counter()
                store.push(delta, base_version=0)
                per_byte = (time.perf_counter() - first) / (4 * n)
                reps = _reps(4 * n, budget_s, per_byte)
                row = {"n": n, "reps": reps,
                       "fetch_s": _median_time(lambda: store.fetch(out), reps),
                       "push_s": _median_time(lambda: store.push(delta, base_version=0), reps)}
                for density in DENSITIES:
                    for block in blocks:
                        idx = _sparse_indices(rng, n, density, block)
                        vals = delta[idx]
                        row[_key(density, block)] = _median_time(
                            lambda: store.push_sparse(idx, vals, base_version=0), reps)
                results.append(row)
            polled_barrier(comm)
    if comm.rank == 1:
        print("RESULT " + json.dumps(results), flush=True)


_POLL_S = 0.0005  # asyncsgd.algorithms.downpour.worker's _COMM_POLL_S


def step_program(steps: int, reps: int, sparse_block: int):
    """Rank 0 serves speech_cnn; rank 1 is a DownpourWorker timing its step without communication, with fetch +
    push inline every step, and with ``--overlap push`` and ``all`` (dense; sparse 1% of blocks); prints RESULT json.

    The variants alternate ``reps`` times so drifting load hits them alike; each variant's ratio is the median over
    the repetitions of its mean step over the mean step without communication measured just before it.
    """
    import numpy as np
    from mpi4py import MPI

    from asyncsgd.algorithms.downpour.worker import DownpourWorker
    from asyncsgd.backends import select_ops
    from asyncsgd.runtime.mpi import polled_barrier
    from asyncsgd.model import build_model
    from asyncsgd.options import DownpourOptions, NoDecay
    from asyncsgd.schedule import Constant
    from asyncsgd.store import ShardedParameters

    comm = MPI.COMM_WORLD
    net = build_model("speech_cnn", (1, 40, 64), 10, seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 1, 40, 64)).astype(np.float32)
    y = rng.integers(0, 10, 32)

    def cfg(**kw):
        return DownpourOptions(lr_schedule=Constant(), staleness=NoDecay(), optimizer="sgd", momentum=0.9, lr=1e-4,
                               adagrad_eps=1e-6, n_fetch=1, n_push=1, **kw)

    variants = {"compute": None,
                "inline": cfg(sparsity=1.0, overlap="off"),
                "overlap_push": cfg(sparsity=1.0, overlap="push"),
                "overlap_all": cfg(sparsity=1.0, overlap="all"),
                "inline_sparse": cfg(sparsity=0.01, sparse_block=sparse_block, overlap="off"),
                "overlap_push_sparse": cfg(sparsity=0.01, sparse_block=sparse_block, overlap="push"),
                "overlap_all_sparse": cfg(sparsity=0.01, sparse_block=sparse_block, overlap="all")}
    with ShardedParameters(comm, net.n_params, n_servers=1, initial=net.params) as store:
        polled_barrier(comm)
        if comm.rank == 1:
            backend = select_ops("cpu")
            workers = {name: DownpourWorker(c or cfg(sparsity=1.0), net, store, backend, seed=0)
                       for name, c in variants.items()}
            net.loss_and_grad(x, y)
            times = {name: [] for name in workers}
            for _ in range(reps):
                for name, worker in workers.items():
                    # one store serves every variant: polling only where the worker's thread would set it
                    store.poll_s = _POLL_S if worker.comm_thread is not None else None
                    start = time.perf_counter()
                    for _ in range(steps):
                        if name != "compute":
                            worker.fetch()
                        worker.step(x, y)
                        worker.steps += 1
                        if name != "compute":
                            worker.push()
                    worker.drain()  # what is still travelling belongs to this variant's time
                    times[name].append((time.perf_counter() - start) / steps)
            for worker in workers.values():
                worker.close()
            # each variant against the step without communication of the same repetition, median over them
            result = {name: statistics.median(t) for name, t in times.items()}
            result.update({f"{name}_ratio": statistics.median(a / c for a, c in zip(t, times["compute"]))
                           for name, t in times.items()})
            print("RESULT " + json.dumps({"n": net.n_params, "steps": steps, "reps": reps, **result}), flush=True)
        polled_barrier(comm)


def measure_steps(hosts, rate, python, steps: int, reps: int, sparse_block: int) -> dict:
    hosts.set_links(rate=rate)
    argv = ["{python}", os.path.abspath(__file__), "--step-program", "--steps", str(steps), "--reps", str(reps),
            "--sparse-block", str(sparse_block)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = hosts.run_mpi([0, 1], argv, timeout=900, python=python, env=env)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"benchmark job failed (exit {out.returncode}):\n{out.stdout[-3000:]}")


def step_table(rows: list, sparse_block: int) -> str:
    """Return the markdown table of the Downpour step times (ratios to the step without communication)."""
    lines = ["| link | step, no communication | fetch + push inline | `--overlap push` | `--overlap all` | "
             f"sparse 1% (blocks of {sparse_block}) inline | sparse 1% with `--overlap push` | "
             "sparse 1% with `--overlap all` |",
             "|" + "---|" * 8]
    for r in rows:
        c = r["compute"]
        cells = [f"{_ms(r[k])} ({r[k + '_ratio']:.2f})"
                 for k in ("inline", "overlap_push", "overlap_all", "inline_sparse", "overlap_push_sparse",
                           "overlap_all_sparse")]
        lines.append(f"| {r['link']} | {_ms(c)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _key(density: float, block: int) -> str:
    return f"sparse_{density:g}_s" if block == 1 else f"sparse_{density:g}_b{block}_s"


def measure(hosts, rate, delay, sizes, python, budget_s: float, blocks: list) -> list:
    hosts.set_links(rate=rate, delay=delay)
    argv = ["{python}", os.path.abspath(__file__), "--rank-program", "--budget", str(budget_s),
            "--sizes", *map(str, sizes), "--blocks", *map(str, blocks)]
    out = hosts.run_mpi([0, 1], argv, timeout=900, python=python)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"benchmark job failed (exit {out.returncode}):\n{out.stdout[-3000:]}")


def _size(name: str) -> int:
    if name.isdigit():
        return int(name)
    from asyncsgd.model import build_model
    return build_model(name).n_params


def table(rows: list, labels: dict, blocks: list) -> str:
    """Return the markdown table of every measured row: each sparse selection's time and its ratio to dense."""
    sparse = [(d, b) for b in blocks for d in DENSITIES]
    names = {(d, b): f"{d:.0%} {'scattered' if b == 1 else f'blocks of {b}'}" for d, b in sparse}
    head = ("| link | parameters | fetch | dense push | " + " | ".join(names[c] for c in sparse) + " | "
            + " | ".join(f"dense / {names[c]}" for c in sparse) + " |")
    lines = [head, "|" + "---|" * (4 + 2 * len(sparse))]
    for r in rows:
        lines.append(f"| {r['link']} | {labels[r['n']]} | {_ms(r['fetch_s'])} | {_ms(r['push_s'])} | "
                     + " | ".join(_ms(r[_key(*c)]) for c in sparse) + " | "
                     + " | ".join(f"{r['push_s'] / r[_key(*c)]:.1f}x" for c in sparse) + " |")
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", nargs="+", default=["1gbit", "10gbit"], help="link rates in tc units")
    parser.add_argument("--delay", default="100us", help="one-way delay added per host (netem); 'none' for none")
    parser.add_argument("--sizes", nargs="+", default=["speech_cnn", "25000000"],
                        help="vector sizes: a model name or a parameter count")
    parser.add_argument("--python", default=None, help="interpreter whose MPI to use (default: this one)")
    parser.add_argument("--budget", type=float, default=4.0, help="seconds per measured operation, roughly")
    parser.add_argument("--blocks", nargs="+", type=int, default=[1, 32],
                        help="sparse selections timed: 1 = single entries, B = whole blocks of B entries")
    parser.add_argument("--only", default="ops,step",
                        help="ops: fetch and push times; step: a speech_cnn Downpour step with and without overlap")
    parser.add_argument("--step-rates", nargs="+", default=["1gbit"], help="link rates of the step measurement")
    parser.add_argument("--steps", type=int, default=10, help="steps per variant and repetition (step)")
    parser.add_argument("--reps", type=int, default=7, help="repetitions of every variant (step)")
    parser.add_argument("--sparse-block", type=int, default=32, help="block of the sparse variant (step)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--rank-program", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--step-program", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank_program:
        rank_program([int(s) for s in args.sizes], args.budget, args.blocks)
        return 0
    if args.step_program:
        step_program(args.steps, args.reps, args.sparse_block)
        return 0
    parts = args.only.split(",")

    from hosts import Hosts, mpi_flavour_of, netem_available, unavailable
    why = unavailable()
    if why is not None:
        print(f"bench_network: cannot make hosts here: {why}", file=sys.stderr)
        return 2
    sizes = [_size(s) for s in args.sizes]
    labels = {n: (f"{n / 1e6:.2f}M ({name})" if not name.isdigit() else f"{n / 1e6:g}M") for n, name in
              zip(sizes, args.sizes)}
    delay = None if args.delay in ("none", "0") else args.delay
    note = f"one-way delay {delay}" if delay else "no added delay"
    if delay and not netem_available():
        note = f"no added delay: this kernel has no netem qdisc (asked for {delay})"
        delay = None
    python = args.python or sys.executable
    flavour = mpi_flavour_of(python)
    rows, step_rows = [], []
    started = time.monotonic()
    with Hosts(2) as hosts:
        for rate in ([None] + args.rates) if "ops" in parts else []:
            got = measure(hosts, rate, delay if rate else None, sizes, python, args.budget, args.blocks)
            for row in got:
                row["link"] = _link(rate)
                rows.append(row)
            print(f"  measured {rows[-1]['link']} ({time.monotonic() - started:.0f} s)", file=sys.stderr)
        for rate in args.step_rates if "step" in parts else []:
            row = measure_steps(hosts, rate, python, args.steps, args.reps, args.sparse_block)
            row["link"] = _link(rate)
            step_rows.append(row)
            print(f"  measured steps at {row['link']} ({time.monotonic() - started:.0f} s)", file=sys.stderr)
    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"# bench_network: {flavour}, 1 server (host0) + 1 worker (host1), {note}; "
          f"{platform.node()}, {os.cpu_count()} cores, {now:%Y-%m-%d %H:%M} UTC")
    if rows:
        print(table(rows, labels, args.blocks))
    if step_rows:
        print(step_table(step_rows, args.sparse_block))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mpi": flavour, "note": note, "rows": rows, "steps": step_rows}, f, indent=1)
    return 0


def _link(rate) -> str:
    return "unlimited" if rate is None else rate.replace("gbit", " Gbit/s").replace("mbit", " Mbit/s")


if __name__ == "__main__":
    sys.exit(main())
