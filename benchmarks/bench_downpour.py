"""Downpour benchmarks: every figure is a ratio against a reference measured in the same run.

    python benchmarks/bench_downpour.py [--quick] [--only overhead,scaling,tta,sparse]

* overhead: a worker's step time with fetch + push every step over its step time without communication
  (1 server + 1 worker, speech_cnn, batch 32; goal <= 1.05);
* scaling: aggregate samples/s of W workers over W x samples/s of one worker, W = 1 .. cores
  (efficiency; Chan & Lane report 68% at 5 GPU workers; goal >= 90%);
* tta: wall time to 95% test accuracy on the bundled FSDD features, W = 2 and 5 workers against 1;
* sparse: bytes per push, push time and final accuracy at 1% and 10% density against dense pushes, same time budget.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import record  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from asyncsgd.testing.launch import run_mpi  # noqa: E402


def _train(n, args, timeout=900):
    with tempfile.TemporaryDirectory() as tmp:
        summary = os.path.join(tmp, "s.json")
        env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1"}
        proc = run_mpi(n, [sys.executable, "-m", "asyncsgd.train", "--progress", "none",
                           "--summary-json", summary] + args, timeout=timeout, env=env, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"training failed:\n{proc.stdout[-3000:]}")
        with open(summary) as f:
            return json.load(f)


_OVERHEAD_WORKER = r"""
import sys, time, json, numpy
from mpi4py import MPI
sys.path.insert(0, sys.argv[1])
from asyncsgd.model import build_model
from asyncsgd.store import ShardedParameters
comm = MPI.COMM_WORLD
steps = int(sys.argv[2])
net = build_model("speech_cnn", (1, 40, 64), 10, seed=0)
rng = numpy.random.default_rng(0)
x = rng.standard_normal((32, 1, 40, 64)).astype(numpy.float32)
y = rng.integers(0, 10, 32)
delta = numpy.zeros(net.n_params, numpy.float32)
with ShardedParameters(comm, net.n_params, n_servers=1, initial=net.params) as store:
    comm.Barrier()
    if comm.rank == 1:
        net.loss_and_grad(x, y)
        res = {}
        for rep in range(3):  # interleave the two variants so drifting machine load hits both alike
            for variant in ("compute", "fetch+push"):
                t = time.perf_counter()
                for _ in range(steps):
                    if variant == "fetch+push":
                        v = store.fetch(net.params)
                    net.loss_and_grad(x, y)
                    numpy.multiply(net.grads, -1e-6, out=delta)
                    net.params += delta
                    if variant == "fetch+push":
                        store.push(delta, base_version=v)
                res.setdefault(variant, []).append((time.perf_counter() - t) / steps)
        print("RESULT " + json.dumps(res), flush=True)  # every round; the best of each variant counts
    comm.Barrier()
"""


def bench_overhead(quick):
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(_OVERHEAD_WORKER)
    try:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        proc = run_mpi(2, [sys.executable, f.name, REPO, "10" if quick else "30"], timeout=600, env=env)
    finally:
        os.unlink(f.name)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(proc.stdout[-2000:])
    rounds = json.loads(line[7:])
    r = {k: min(v) for k, v in rounds.items()}
    print(f"overhead: step {r['compute'] * 1e3:.1f} ms compute only, {r['fetch+push'] * 1e3:.1f} ms with fetch+push "
          f"of {661834 * 4 / 2**20:.1f} MiB -> ratio {r['fetch+push'] / r['compute']:.3f} (goal <= 1.05)")
    return {"compute_s": r["compute"], "fetch_push_s": r["fetch+push"], "ratio": r["fetch+push"] / r["compute"],
            "rounds_s": rounds}


_COMPUTE_ONLY = r"""
import sys, time, numpy
sys.path.insert(0, sys.argv[1])
from asyncsgd.model import build_model
net = build_model("speech_cnn", (1, 40, 64), 10, seed=0)
rng = numpy.random.default_rng(0)
x = rng.standard_normal((32, 1, 40, 64)).astype(numpy.float32)
y = rng.integers(0, 10, 32)
net.loss_and_grad(x, y)
t = time.perf_counter()
for _ in range(int(sys.argv[2])):
    net.loss_and_grad(x, y)
print(int(sys.argv[2]) * 32 / (time.perf_counter() - t))
"""


def _independent_processes(w, steps):
    """Aggregate samples/s of w independent single-threaded training processes: the machine's own ceiling."""
    import subprocess
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _COMPUTE_ONLY, REPO, str(steps)], stdout=subprocess.PIPE,
                              text=True, env=env) for _ in range(w)]
    return sum(float(p.communicate()[0]) for p in procs)


def bench_scaling(quick):
    cores = os.cpu_count() or 1
    ceiling = {w: _independent_processes(w, 30 if quick else 100) for w in range(1, cores + 1)}
    for w, v in ceiling.items():
        print(f"scaling: ceiling, {w} independent process(es) without MPI: {v:.0f} samples/s, "
              f"efficiency {v / (w * ceiling[1]):.2f}")
    steps = "30" if quick else "120"
    base = None
    rows = []
    for w in range(1, cores + 1):
        s = _train(w + 1, ["--data", "synthetic:2000", "--steps", steps, "--eval-every", "1000"])
        agg = sum(s["per_worker_samples_per_s"])
        base = agg if base is None else base
        eff = agg / (w * base)
        rows.append((w, agg, eff))
        print(f"scaling: {w} worker(s): {agg:.0f} samples/s aggregate, efficiency {eff:.2f}")
    return {"ceiling_samples_per_s": ceiling,
            "workers": [{"workers": w, "samples_per_s": agg, "efficiency": eff} for w, agg, eff in rows]}


def bench_tta(quick):
    out = {}
    for w in (1, 2, 5):
        t = time.monotonic()
        s = _train(w + 1, ["--target-accuracy", "0.95", "--time-limit", "300" if not quick else "60",
                           "--eval-every", "2"])
        out[w] = (s["time_to_target"], s["test_accuracy"], time.monotonic() - t)
        print(f"tta: {w} worker(s): time to 95% {s['time_to_target']} s (final accuracy {s['test_accuracy']:.3f})")
    for w in (2, 5):
        if out[1][0] and out[w][0]:
            print(f"tta: {w} workers against 1: {out[1][0] / out[w][0]:.2f}x faster")
    return {w: {"time_to_95_s": t, "test_accuracy": a, "wall_s": wall} for w, (t, a, wall) in out.items()}


def bench_sparse(quick):
    limit = "60" if quick else "100"
    rows = {}
    for label, args in (("dense", []), ("10%", ["--sparsity", "0.1"]), ("1%", ["--sparsity", "0.01"])):
        s = _train(6, ["--time-limit", limit, "--eval-every", "5"] + args)
        per_push = s["push_bytes"] / max(s["pushes"], 1)
        rows[label] = (per_push, s["test_accuracy"], s["pushes"])
        print(f"sparse: {label:>5}: {per_push / 1024:.0f} KiB per push, {s['pushes']} pushes in {limit} s, "
              f"accuracy {s['test_accuracy']:.3f}")
    return {label: {"bytes_per_push": b, "test_accuracy": a, "pushes": n} for label, (b, a, n) in rows.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps (a smoke run, noisier figures)")
    ap.add_argument("--only", default="overhead,scaling,tta,sparse")
    ap.add_argument("--json-out", help="write every figure here (docs/BENCHMARKS.md)")
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}")
    load = list(os.getloadavg())
    results = {}
    for name in args.only.split(","):
        results[name] = {"overhead": bench_overhead, "scaling": bench_scaling, "tta": bench_tta,
                         "sparse": bench_sparse}[name](args.quick)
        record.write(args.json_out, results, started_load=load)  # after each part: a later failure keeps these


if __name__ == "__main__":
    main()
