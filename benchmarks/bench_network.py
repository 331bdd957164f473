"""What the network costs the parameter store: fetch and push times between two hosts at 1 and 10 Gbit/s.

    sudo python benchmarks/bench_network.py [--rates 1gbit 10gbit] [--delay 100us] [--sizes speech_cnn 25000000]

Builds two hosts on this machine (tests/hosts.py: network namespaces on a bridge, ``tc tbf`` link limits, MPI over
TCP between them; needs root and iproute2), puts the store's one server rank on host0 and one worker rank on host1,
so every byte crosses a limited link, and times, for each link rate and vector size:

- ``fetch`` (``Get`` of the whole vector) and a dense ``push`` (``Accumulate(SUM)``);
- sparse pushes (``push_sparse``, random unsorted indices as top-k selection gives them) at 1% and 10% density,
  building the indexed datatype included, as ratios to the dense push measured in the same run;
- the same with no link limit (veth at memory speed), as the yardstick.

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
sys.path.insert(0, os.path.join(ROOT, "tests"))
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


def rank_program(sizes: list, budget_s: float):
    """Rank 0 serves the whole vector; rank 1 times fetch, dense and sparse pushes; rank 1 prints RESULT json."""
    import numpy as np
    from mpi4py import MPI

    from asyncsgd.mpiutil import polled_barrier
    from asyncsgd.store import open_store  # ASYNCSGD_STORE (tests/hosts.py: messages under Open MPI)

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
                    k = max(1, int(density * n))
                    idx = rng.choice(n, k, replace=False)                # unsorted, as top-k gives them
                    vals = delta[idx]
                    row[f"sparse_{density:g}_s"] = _median_time(
                        lambda: store.push_sparse(idx, vals, base_version=0), reps)
                results.append(row)
            polled_barrier(comm)
    if comm.rank == 1:
        print("RESULT " + json.dumps(results), flush=True)


def measure(hosts, rate, delay, sizes, python, budget_s: float) -> list:
    hosts.set_links(rate=rate, delay=delay)
    argv = ["{python}", os.path.abspath(__file__), "--rank-program", "--budget", str(budget_s),
            "--sizes", *map(str, sizes)]
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


def table(rows: list, labels: dict) -> str:
    """Return the markdown table of every measured row."""
    head = ("| link | parameters | fetch | dense push | sparse 10% | sparse 1% | dense / 10% | dense / 1% | "
            "dense push vs unlimited |")
    lines = [head, "|" + "---|" * 9]
    base = {r["n"]: r["push_s"] for r in rows if r["link"] == "unlimited"}
    for r in rows:
        lines.append(f"| {r['link']} | {labels[r['n']]} | {_ms(r['fetch_s'])} | {_ms(r['push_s'])} | "
                     f"{_ms(r['sparse_0.1_s'])} | {_ms(r['sparse_0.01_s'])} | "
                     f"{r['push_s'] / r['sparse_0.1_s']:.1f}x | {r['push_s'] / r['sparse_0.01_s']:.1f}x | "
                     f"{r['push_s'] / base[r['n']]:.1f}x |")
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
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--rank-program", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank_program:
        rank_program([int(s) for s in args.sizes], args.budget)
        return 0

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
    rows = []
    started = time.monotonic()
    with Hosts(2) as hosts:
        for rate in [None] + args.rates:
            got = measure(hosts, rate, delay if rate else None, sizes, python, args.budget)
            for row in got:
                row["link"] = "unlimited" if rate is None else rate.replace("gbit", " Gbit/s").replace(
                    "mbit", " Mbit/s")
                rows.append(row)
            print(f"  measured {rows[-1]['link']} ({time.monotonic() - started:.0f} s)", file=sys.stderr)
    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"# bench_network: {flavour}, 1 server (host0) + 1 worker (host1), {note}; "
          f"{platform.node()}, {os.cpu_count()} cores, {now:%Y-%m-%d %H:%M} UTC")
    print(table(rows, labels))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mpi": flavour, "note": note, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
