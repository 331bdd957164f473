"""Run one training command line at several seeds; print the spread of the selected model's final test accuracy.

    python benchmarks/bench_seeds.py [--seeds 0,1,2,3,4] [--min-accuracy 0.985] [--max-spread 0.01] -- COMMAND...

COMMAND is the training command as a user types it, e.g. ``.venv/bin/mpirun -n 6 .venv/bin/python -m
asyncsgd.train`` or ``.venv/bin/python -m asyncsgd.train --mode serial``; each run appends ``--seed S
--summary-json FILE`` (so COMMAND must not set them).  Runs go one after another (the machines are small and shared;
concurrent runs would measure each other), each under a wall-clock limit, with the environment both PyPI MPIs need
(asyncsgd.testing.launch.mpi_env).  The accuracy read from each summary is ``selected_test_accuracy`` (the model chosen by
validation accuracy) when the summary has it, else ``test_accuracy`` (runs without a validation split), and the
line says which.

Prints one line per run (seed, accuracy, selected model, stop reason, wall time), then min / median / max and
max - min.  Exit status: 0, or 1 when a given --min-accuracy or --max-spread is not met, or 2 when a run failed.
``--json-out FILE`` writes every run's figures (with the 1-minute load average as it ended) and the statistics for
docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from asyncsgd.testing.launch import mpi_env  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import record  # noqa: E402

ACCURACY_KEYS = ("selected_test_accuracy", "test_accuracy")
TOLERANCE = 1e-9


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds needs distinct integers >= 0, got {text!r}")
    return seeds


def run_once(command: list[str], seed: int, timeout: float) -> dict:
    """Run ``command --seed SEED --summary-json F``; return the figures of its summary (or the failure)."""
    with tempfile.TemporaryDirectory(prefix="bench_seeds_") as tmp:
        summary_path = os.path.join(tmp, "summary.json")
        argv = list(command) + ["--seed", str(seed), "--summary-json", summary_path]
        env = mpi_env()
        env.setdefault("MPIEXEC_TIMEOUT", str(int(timeout)))   # MPICH's own job limit, a backstop
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)            # the whole job: mpiexec and every rank
            out, _ = proc.communicate()
            return {"seed": seed, "error": f"timed out after {timeout:g} s", "output": out[-2000:]}
        wall = time.monotonic() - t0
        if proc.returncode != 0 or not os.path.exists(summary_path):
            return {"seed": seed, "error": f"exit status {proc.returncode}", "output": out[-2000:]}
        with open(summary_path) as f:
            summary = json.load(f)
    key = next((k for k in ACCURACY_KEYS if summary.get(k) is not None), None)
    if key is None:
        return {"seed": seed, "error": f"the summary has none of {', '.join(ACCURACY_KEYS)}", "output": ""}
    return {"seed": seed, "accuracy": float(summary[key]), "accuracy_key": key,
            "selected_model": summary.get("selected_model", "last"),
            "validation_accuracy": summary.get("selected_validation_accuracy"),
            "last_test_accuracy": summary.get("last_test_accuracy", summary.get("test_accuracy")),
            "stop_reason": summary.get("stop_reason"), "wall_s": wall, "mode": summary.get("mode"),
            "load_1min": os.getloadavg()[0],   # the machine's load as the run ended: wall times depend on it
            # both models' figures and the margin applied, to compare selection rules afterwards
            **{k: summary.get(k) for k in ("last_validation_accuracy", "best_validation_accuracy",
                                           "best_test_accuracy", "best_evaluation", "evaluations",
                                           "selection_margin_accuracy")}}


def spread(values: list[float]) -> dict:
    """Return min, median, max and max - min of ``values``."""
    return {"n": len(values), "min": min(values), "median": statistics.median(values), "max": max(values),
            "spread": max(values) - min(values)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                usage="%(prog)s [options] -- COMMAND...")
    p.add_argument("--seeds", type=_seeds, default=[0, 1, 2, 3, 4], help="comma-separated seeds (default 0,1,2,3,4)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run before it is killed (default 1800)")
    p.add_argument("--min-accuracy", type=float, default=None, help="fail (exit 1) if any run ends below this")
    p.add_argument("--max-spread", type=float, default=None, help="fail (exit 1) if max - min exceeds this")
    p.add_argument("--json-out", default=None, help="write every run and the statistics here (JSON)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the training command line, after --")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the training command after --, e.g. -- python -m asyncsgd.train --mode serial")
    if any(a in ("--seed", "--summary-json") or a.startswith(("--seed=", "--summary-json=")) for a in command):
        p.error("the command must not set --seed or --summary-json: this script sets them for each run")
    print(f"command: {' '.join(command)}", flush=True)
    started_load = list(os.getloadavg())
    runs = []
    for seed in args.seeds:
        r = run_once(command, seed, args.timeout)
        runs.append(r)
        if "error" in r:
            print(f"seed {seed}: FAILED ({r['error']})\n{r['output']}", flush=True)
            continue
        val = r["validation_accuracy"]
        print(f"seed {seed}: test accuracy {r['accuracy']:.4f} ({r['accuracy_key']}, model {r['selected_model']}"
              f"{'' if val is None else f', validation {val:.4f}'}), last model's test accuracy "
              f"{r['last_test_accuracy']:.4f}, stop {r['stop_reason']}, wall {r['wall_s']:.1f} s", flush=True)
    good = [r["accuracy"] for r in runs if "error" not in r]
    stats = spread(good) if good else None
    if stats:
        print(f"{stats['n']} runs: min {stats['min']:.4f}  median {stats['median']:.4f}  max {stats['max']:.4f}  "
              f"spread {stats['spread']:.4f}")
    failed = len(good) < len(runs)
    verdicts = []
    # accuracies are counts over a test set (0.99 - 0.98 is 3/300 = 0.01 exactly, 0.010000000000000009 in floats):
    # compare with a tolerance far below one example of any test set
    if stats and args.min_accuracy is not None:
        verdicts.append(("min >= %g" % args.min_accuracy, stats["min"] >= args.min_accuracy - TOLERANCE))
    if stats and args.max_spread is not None:
        verdicts.append(("spread <= %g" % args.max_spread, stats["spread"] <= args.max_spread + TOLERANCE))
    for what, ok in verdicts:
        print(f"{what}: {'met' if ok else 'NOT met'}")
    # record.write adds this script's own command line, the UTC date and the machine (CPU model, MPI, load at the end)
    record.write(args.json_out, {"train_command": command, "runs": runs, "stats": stats,
                                 "verdicts": {what: ok for what, ok in verdicts}}, started_load=started_load)
    if failed:
        return 2
    return 0 if all(ok for _, ok in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
