"""Time to 95% and 98% FSDD test accuracy: asyncsgd against PyTorch CPU, in one invocation on one machine.

    python benchmarks/bench_peers.py [--repeats 3] [--ranks 3,4] [--limit 150] [--eval-every 2]
                                     [--only downpour,serial,torch,torch-ddp] [--json-out FILE] [--quick]

PyTorch is an optional benchmark dependency (the ``bench`` extra):
``pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu``.  Without it the PyTorch rows are
skipped, with the reason in the table and the JSON.

Configurations; each repetition runs all of them in turn, so a change in the machine's load falls on all alike:

* ``downpour-6``: ``mpirun -n 6 python -m asyncsgd.train``, the README's default command (1 server + 5 workers);
* ``downpour-R`` for each R of ``--ranks`` (default 3 and 4): the same command at R ranks.  The best rank count for
  the machine is the one with the lowest median time to 98% (then 95%) over the repetitions of this run;
* ``serial``: ``python -m asyncsgd.train --mode serial`` (numpy with its default BLAS threads: all cores);
* ``torch``: PyTorch, one process, ``torch.set_num_threads(cores)``;
* ``torch-ddp``: PyTorch DistributedDataParallel, gloo on 127.0.0.1, one process per core, one thread each.

Same inputs.  The PyTorch runs read the bundled ``data/fsdd.h5`` through ``asyncsgd.data`` and train on the rows
asyncsgd trains on (``TrainingSplit``: the default 10% class-balanced validation hold-out, seed 0; DDP rank r gets
the class-strided share r of W, as asyncsgd's sync mode does), batches from ``BatchStream`` with asyncsgd's random
time shifts of up to 6 frames (``--augment auto``), and report accuracy on the same 300-row test set.  The network
is ``bench_conv.torch_network``, the twin of ``speech_cnn``, started from asyncsgd's initial weights (copied, and the
copy checked by ``bench_conv.check_same_function``).  The optimizer is serial mode's: SGD with momentum 0.9
(``v = 0.9 v + g; w -= lr v`` in both), batch 32, peak rate 0.01 under ``warmup:0.05+cosine`` over 30 epochs.  DDP
keeps those per replica and averages gradients (a global batch of 32 x W, as ``--mode sync`` does).

The clock: seconds of training, from the first step to the evaluated snapshot, excluding start-up (imports, MPI
start, data loading) and evaluation.  asyncsgd's figure is the ``time`` of its JSONL metrics log (one record per
evaluation).  Downpour's rank 0 scores a snapshot of the store while the workers keep training, so nothing is
subtracted there: its evaluations (validation and test rows) take CPU time from the workers, which is a cost of the
default command.  Serial mode stops training to evaluate, so the bench runs it through a wrapper (``--serial-worker``)
that adds the seconds spent evaluating to each record (``eval_s``) and subtracts them; the PyTorch runs pause their
clock while they evaluate.  Every run evaluates every ``--eval-every`` seconds of training (serial and PyTorch
single-process also at each epoch's end, as serial mode does).

Every run stops once it has reached the highest target or trained ``--limit`` seconds; a run that does not end within
``--limit`` plus ``--startup`` seconds of wall time is killed with its whole process group (every process of a run
is in one group; the bench kills that group also when it stops a run at its target).  Prints a table of medians, the ratio of
each median to the best PyTorch configuration's, the machine's load average at start and end; ``--json-out`` writes
every run.  Exit status 0 when every run ran (a target not reached is a result), 1 when one failed, 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from record import machine as machine_facts  # noqa: E402
TORCH_INSTALL = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TARGETS = (0.95, 0.98)
KINDS = ("downpour", "serial", "torch", "torch-ddp")
SEED, VALIDATION, BATCH, PEAK_LR, MOMENTUM, EPOCHS = 0, 0.1, 32, 0.01, 0.9, 30   # serial mode's defaults
SCHEDULE = "warmup:0.05+cosine"


# ---------------------------------------------------------------------------------------------------------------
# workers (run in their own processes)

def serial_worker(argv):
    """Run ``python -m asyncsgd.train --mode serial ARGV`` with its evaluations timed: every metrics record gets
    ``eval_s``, the seconds spent evaluating so far (serial mode stops training while it evaluates)."""
    sys.path.insert(0, REPO)
    from asyncsgd import train
    from asyncsgd.algorithms import serial

    class TimedEvaluations(serial.Evaluations):
        spent = 0.0

        def __call__(self, params_host, **extra):
            t0 = time.perf_counter()
            out = super().__call__(params_host, **extra)
            TimedEvaluations.spent += time.perf_counter() - t0
            return {**out, "eval_s": TimedEvaluations.spent}

    serial.Evaluations = TimedEvaluations
    return train.main(["--mode", "serial"] + argv)


def torch_worker(args):
    """One PyTorch process (rank ``args.rank`` of ``args.world``); rank 0 writes the metrics log ``args.log``."""
    import numpy
    import torch
    sys.path[:0] = [REPO, HERE]
    from asyncsgd.algorithms.common import TrainingSplit
    from asyncsgd.data import BatchStream, open_source
    from asyncsgd.data.augment import make_augmenter
    from asyncsgd.model import build_model
    from asyncsgd.schedule import RunBudget, parse_schedule
    from bench_conv import check_same_function, torch_network

    torch.set_num_threads(args.threads)
    rank, world = args.rank, args.world
    src = open_source("fsdd")
    split = TrainingSplit(src, VALIDATION, SEED)
    x, y = split.share(rank, world)
    x_test, y_test = src.test_set()
    shape, n_classes = tuple(x.shape[1:]), int(max(y.max(), y_test.max())) + 1
    tnet = torch_network(torch, shape, n_classes)
    check_same_function(torch, build_model("speech_cnn", shape, n_classes, seed=SEED), tnet, x[:BATCH], y[:BATCH])
    tnet.train()
    model = tnet
    if world > 1:
        import datetime
        import torch.distributed as dist
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120))
        model = torch.nn.parallel.DistributedDataParallel(tnet)
    opt = torch.optim.SGD(model.parameters(), lr=PEAK_LR, momentum=MOMENTUM)
    schedule = parse_schedule(SCHEDULE, lr=PEAK_LR)
    budget = RunBudget.from_limits(n_train=split.n_train, batch_size=BATCH, workers=world, epochs=EPOCHS)
    stream = BatchStream(x, y, BATCH, seed=SEED + rank)
    augment = make_augmenter("auto", src, seed=SEED + 3000 + rank)
    loss_fn = torch.nn.CrossEntropyLoss()
    tx_test, ty_test = torch.from_numpy(x_test), torch.from_numpy(numpy.asarray(y_test, dtype=numpy.int64))

    def test_accuracy() -> float:
        tnet.eval()
        with torch.no_grad():
            right = sum(int((tnet(tx_test[i:i + 256]).argmax(1) == ty_test[i:i + 256]).sum())
                        for i in range(0, len(ty_test), 256))
        tnet.train()
        return right / len(ty_test)

    log = open(args.log, "w") if rank == 0 else None
    trained, last_eval, samples, steps, stop = 0.0, 0.0, 0, 0, False
    flag = torch.zeros(1, dtype=torch.int32)
    if world > 1:
        dist.barrier()
    for xb, yb in stream:
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = schedule.rate(budget.fraction(samples))
        xb, yb = torch.from_numpy(augment(xb)), torch.from_numpy(yb)
        opt.zero_grad(set_to_none=True)
        loss_fn(model(xb), yb).backward()
        opt.step()
        trained += time.perf_counter() - t0
        steps += 1
        samples += len(yb) * world
        epoch_end = stream.samples_seen % len(y) < len(yb)
        if rank == 0 and (trained - last_eval >= args.eval_every or (epoch_end and world == 1)):
            acc = test_accuracy()
            log.write(json.dumps({"time": trained, "test_accuracy": acc, "samples": samples, "steps": steps,
                                  "epoch": samples / split.n_train}) + "\n")
            log.flush()
            last_eval = trained
            stop = acc >= args.stop_at or trained >= args.limit
        if world > 1:  # rank 0 tells the others when to stop; the broadcast is part of each step's cost
            t1 = time.perf_counter()
            flag[0] = int(stop)
            dist.broadcast(flag, 0)
            stop = bool(flag[0])
            trained += time.perf_counter() - t1
        if stop:
            break
    if log is not None:
        log.close()
    if world > 1:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# the driver

def find_mpiexec() -> str | None:
    """The mpiexec beside this Python (a virtualenv's own MPI), else the one on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.path.exists(here) else shutil.which("mpiexec")


def read_records(path: str) -> list[dict]:
    """The complete lines of a JSONL metrics log written so far."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        text = f.read()
    return [json.loads(line) for line in text.splitlines()[: text.count("\n")] if line.strip()]


def training_time(record: dict) -> float:
    return record["time"] - record.get("eval_s", 0.0)


def kill_group(procs):
    """SIGTERM the process group of ``procs[0]`` (every process of the run), SIGKILL what is left after 5 s."""
    pgid = procs[0].pid
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        end = time.monotonic() + grace
        while time.monotonic() < end and any(p.poll() is None for p in procs):
            time.sleep(0.1)
        if all(p.poll() is not None for p in procs):
            return


def run_monitored(cmds, log, *, stop_at, limit, timeout, env):
    """Start ``cmds`` (one process group), watch the metrics log ``log`` and stop the run once a record reaches
    ``stop_at`` test accuracy or ``limit`` seconds of training, or after ``timeout`` s of wall time.

    Returns (status, records, output tail, note); status "ok" when the log holds at least one record and no process
    failed before the bench stopped it (a run stopped at the wall-time allowance is a result, the note says so).
    """
    outs = [tempfile.TemporaryFile(mode="w+") for _ in cmds]
    # the first process leads a new process group, the others join it: one killpg ends the whole run
    procs = [subprocess.Popen(cmds[0], stdout=outs[0], stderr=subprocess.STDOUT, cwd=REPO, env=env,
                              preexec_fn=lambda: os.setpgid(0, 0))]
    start, stopped, why, note = time.monotonic(), False, None, None
    try:
        for cmd, out in zip(cmds[1:], outs[1:]):
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                          preexec_fn=lambda pgid=procs[0].pid: os.setpgid(0, pgid)))
        while True:
            records = read_records(log)
            if records and (records[-1]["test_accuracy"] >= stop_at or training_time(records[-1]) >= limit):
                stopped = True
                break
            if all(p.poll() is not None for p in procs):
                break
            if any(p.poll() not in (None, 0) for p in procs):
                why = "exit status " + ",".join(str(p.poll()) for p in procs if p.poll() not in (None, 0))
                break
            if time.monotonic() - start > timeout:
                stopped, note = True, f"stopped at the wall-time allowance, {timeout:.0f} s"
                break
            time.sleep(0.25)
    finally:
        if any(p.poll() is None for p in procs):
            kill_group(procs)
        for p in procs:
            p.wait()
    tail = ""
    for out in outs:
        out.seek(0)
        tail += out.read()[-1500:]
        out.close()
    records = read_records(log)
    if why is None and not stopped and any(p.returncode != 0 for p in procs):
        why = "exit status " + ",".join(str(p.returncode) for p in procs)
    if why is None and not records:
        why = "no evaluation logged" + (f" ({note})" if note else "")
    return ("ok" if why is None else f"failed ({why})"), records, tail, note


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def configurations(args):
    """[(name, kind, ranks or processes)] in the order each repetition runs them."""
    out = []
    if "downpour" in args.only:
        out += [(f"downpour-{n}", "downpour", n) for n in dict.fromkeys([6] + args.ranks)]
    if "serial" in args.only:
        out.append(("serial", "serial", 1))
    if "torch" in args.only:
        out.append(("torch", "torch", 1))
    if "torch-ddp" in args.only:
        out.append((f"torch-ddp-{args.ddp_procs}", "torch-ddp", args.ddp_procs))
    return out


def commands(kind, n, log, args, mpiexec):
    """The command lines of one run, and the command a user would type (for the table)."""
    me = [sys.executable, os.path.abspath(__file__)]
    asgd = ["--eval-every", f"{args.eval_every:g}", "--log", log, "--run-dir", "none", "--progress", "none"]
    if kind == "downpour":
        return ([[mpiexec, "-n", str(n), sys.executable, "-m", "asyncsgd.train"] + asgd],
                f"mpirun -n {n} python -m asyncsgd.train")
    if kind == "serial":
        return [me + ["--serial-worker"] + asgd], "python -m asyncsgd.train --mode serial"
    worker = me + ["--torch-worker", "--log", log, "--eval-every", f"{args.eval_every:g}", "--limit",
                   f"{args.limit:g}", "--stop-at", f"{max(TARGETS):g}"]
    if kind == "torch":
        return [worker + ["--threads", str(os.cpu_count() or 1)]], f"PyTorch, 1 process, {os.cpu_count()} threads"
    port = free_port()
    return ([worker + ["--threads", "1", "--rank", str(r), "--world", str(n), "--port", str(port)]
             for r in range(n)], f"PyTorch DDP (gloo), {n} processes, 1 thread each")


def median_or_none(times, repeats):
    """Median over ``repeats`` runs, a run that did not reach the target counting as infinitely slow; None when the
    median run did not reach it."""
    values = sorted(t if t is not None else float("inf") for t in times)
    values += [float("inf")] * (repeats - len(values))
    m = statistics.median(values) if values else float("inf")
    return None if m == float("inf") else m


def load_text() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def summarize(record, configs, args):
    """Medians per configuration, the best Downpour rank count and PyTorch configuration, the goal."""
    summary = {}
    for name, kind, n in configs:
        runs = [r for r in record["runs"] if r["config"] == name]
        ok = [r for r in runs if r["status"] == "ok"]
        entry = {"kind": kind, "n": n, "command": runs[0]["command"] if runs else None, "runs": len(runs),
                 "ok": len(ok), "status": runs[0]["status"] if runs and not ok else ("ok" if ok else "not run")}
        for t in TARGETS:
            times = [r["time_to"][f"{t:g}"] for r in ok]
            entry[f"median_{t:g}"] = median_or_none(times, len(runs)) if ok else None
            entry[f"reached_{t:g}"] = sum(x is not None for x in times)
            # a run that did not reach the target took longer than it trained: the median is at least this
            bounds = [x if x is not None else r["trained_s"] for x, r in zip(times, ok)]
            entry[f"median_lower_bound_{t:g}"] = statistics.median(bounds) if len(ok) == len(runs) and ok else None
        summary[name] = entry
    record["summary"] = summary

    def key(name):
        """Median time to 98%, then 95%; an unknown median counts as its lower bound (the optimistic reading,
        so the best PyTorch configuration is never picked to flatter asyncsgd)."""
        e = summary[name]
        return tuple(next((v for v in (e[f"median_{t:g}"], e[f"median_lower_bound_{t:g}"]) if v is not None),
                          float("inf")) for t in reversed(TARGETS))

    candidates = [f"downpour-{n}" for n in args.ranks if summary.get(f"downpour-{n}", {}).get("ok")]
    record["best_ranks"] = min(candidates, key=key) if candidates else None
    torches = [name for name, kind, _ in configs if kind.startswith("torch") and summary[name]["ok"]]
    record["best_torch"] = min(torches, key=key) if torches else None
    goal = None
    if record["best_torch"] and summary.get("downpour-6", {}).get("ok"):
        ours, theirs = summary["downpour-6"]["median_0.98"], summary[record["best_torch"]]["median_0.98"]
        bound = summary[record["best_torch"]]["median_lower_bound_0.98"]
        if ours is not None and theirs is not None:
            goal = ours < theirs
        elif ours is not None and bound is not None and ours < bound:
            goal = True    # PyTorch's median run had not reached 98% when it stopped, later than ours did
        elif ours is None and theirs is not None:
            goal = False
    # None: undecided (neither reached it, or PyTorch's runs stopped before our time)
    record["goal_default_beats_best_torch_to_98"] = goal


def print_table(record, configs):
    s, best = record["summary"], record.get("best_torch")
    print(f"\nmachine: {record['machine']['cpus']} CPUs, {record['machine']['platform']}; {record['date']}; "
          f"load average (1, 5, 15 min) {record['load_start']} at start, {record['load_end']} at end")
    print(f"seconds of training to the first evaluation at or above the target test accuracy, median of "
          f"{record['repeats']} run(s) (n/r: the median run did not reach it; per run >T: not reached after T s of "
          f"training, when the run stopped at --limit {record['limit']:g} s or at its wall-time allowance); "
          f"ratio = median / median of the best PyTorch configuration ({best or 'none measured'})")
    head = f"{'configuration':<16} {'command':<48} {'95%':>7} {'98%':>7} {'x95':>5} {'x98':>5}  per run (95% / 98%)"
    print(head)
    print("-" * len(head))

    def fmt(v, width=7, spec=".1f"):
        return f"{v:>{width}{spec}}" if v is not None else f"{'n/r':>{width}}"

    for name, kind, n in configs:
        e = s[name]
        label = name + (" *" if name == record.get("best_ranks") else "")
        if e["ok"] == 0:
            print(f"{label:<16} {e['command'] or '':<48} {e['status']}")
            continue
        ratios = []
        for t in TARGETS:
            ref = s[best][f"median_{t:g}"] if best else None
            ours = e[f"median_{t:g}"]
            ratios.append(ours / ref if ours is not None and ref else None)
        runs = [r for r in record["runs"] if r["config"] == name]
        def one(r, t):
            if r["status"] != "ok":
                return "fail"
            got = r["time_to"][f"{t:g}"]
            return f"{got:.1f}" if got is not None else f">{r['trained_s']:.0f}"

        per = " ".join("/".join(one(r, t) for t in TARGETS) for r in runs)
        print(f"{label:<16} {e['command']:<48} {fmt(e['median_0.95'])} {fmt(e['median_0.98'])} "
              f"{fmt(ratios[0], 5, '.2f')} {fmt(ratios[1], 5, '.2f')}  {per}")
    if record.get("best_ranks"):
        print(f"* best Downpour rank count of {', '.join(str(r) for r in record['ranks'])}: {record['best_ranks']} "
              f"(lowest median time to 98%, then 95%, in this run)")
    goal = record.get("goal_default_beats_best_torch_to_98")
    if best and s.get("downpour-6", {}).get("ok"):
        verdict = {True: "met", False: "NOT met", None: "undecided (a median is unknown: its runs stopped before 98% at fewer seconds than the other's median)"}[goal]
        print(f"goal: the default command (downpour-6) reaches 98% sooner than {best}: {verdict}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--serial-worker"]:  # the rest is asyncsgd.train's command line
        return serial_worker(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="repetitions of every configuration (default 3)")
    ap.add_argument("--ranks", default="3,4", help="Downpour rank counts besides the default 6 (default 3,4)")
    ap.add_argument("--limit", type=float, default=150.0, help="seconds of training before a run gives up")
    ap.add_argument("--eval-every", type=float, default=2.0, help="seconds of training between evaluations")
    ap.add_argument("--startup", type=float, default=120.0,
                    help="seconds allowed per run beyond --limit for start-up (imports, MPI, data); then it is killed")
    ap.add_argument("--ddp-procs", type=int, default=os.cpu_count() or 1, help="DDP processes (default: cores)")
    ap.add_argument("--only", default=",".join(KINDS), help=f"comma-separated kinds to run, of {','.join(KINDS)}")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 1 repetition, Downpour at 6 ranks and the first of --ranks, 2 s of training per run")
    ap.add_argument("--json-out", help="write every run and the summary here")
    ap.add_argument("--table-from", metavar="JSON", help="print the table of a --json-out file again, run nothing")
    ap.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--log", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--stop-at", type=float, default=max(TARGETS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.table_from:
        return reprint(args.table_from)
    if args.torch_worker:
        torch_worker(args)
        return 0
    try:
        args.ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    except ValueError:
        args.ranks = []
    if not args.ranks or min(args.ranks) < 2:
        ap.error("--ranks must be a comma-separated list of rank counts >= 2 (1 server + workers), e.g. 3,4")
    args.only = [k.strip() for k in args.only.split(",") if k.strip()]
    if not args.only or set(args.only) - set(KINDS):
        ap.error(f"--only takes a comma-separated list of {', '.join(KINDS)}, got {','.join(args.only)!r}")
    if args.repeats < 1 or args.limit <= 0 or args.eval_every <= 0 or args.ddp_procs < 1:
        ap.error("--repeats and --ddp-procs must be >= 1, --limit and --eval-every > 0")
    if args.quick:
        args.repeats, args.limit, args.eval_every, args.ranks = 1, 2.0, 0.5, args.ranks[:1]
    mpiexec = find_mpiexec()
    if "downpour" in args.only and mpiexec is None:
        ap.error("no mpiexec beside python or on PATH: install the 'mpich' extra or leave out --only downpour")

    configs = configurations(args)
    torch_missing = None
    try:
        import torch  # noqa: F401 (only whether it imports)
        torch_version = torch.__version__
    except ImportError:
        torch_version, torch_missing = None, f"skipped: torch is not installed in this Python ({TORCH_INSTALL})"
    import numpy
    # machine_facts (benchmarks/record.py) adds the CPU model and the MPI library mpi4py loads (load: see load_start)
    facts = {k: v for k, v in machine_facts().items() if k != "loadavg"}
    record = {"command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + argv),
              "date": time.strftime("%Y-%m-%d %H:%M %Z"), "targets": list(TARGETS), "repeats": args.repeats,
              "limit": args.limit, "eval_every": args.eval_every, "ranks": args.ranks, "quick": args.quick,
              "machine": {**facts, "platform": platform.platform(), "numpy": numpy.__version__,
                          "torch": torch_version, "mpiexec": mpiexec},
              "load_start": load_text(), "runs": []}
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                               "MKL_NUM_THREADS")}  # each side picks its threads
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p))
    failed = False
    print(f"bench_peers: {os.cpu_count()} CPUs, load average {record['load_start']}, {args.repeats} repetition(s), "
          f"limit {args.limit:g} s, evaluation every {args.eval_every:g} s of training", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        for rep in range(args.repeats):
            for name, kind, n in configs:
                log = os.path.join(tmp, f"{name}-{rep}.jsonl")
                cmds, shown = commands(kind, n, log, args, mpiexec)
                run = {"config": name, "kind": kind, "n": n, "repeat": rep, "command": shown,
                       "time_to": {f"{t:g}": None for t in TARGETS}}
                if kind.startswith("torch") and torch_missing:
                    run.update(status=torch_missing)
                    record["runs"].append(run)
                    continue
                t0 = time.monotonic()
                status, records, tail, note = run_monitored(cmds, log, stop_at=max(TARGETS), limit=args.limit,
                                                      timeout=args.limit + args.startup, env=env)
                run.update(status=status, note=note, wall_s=time.monotonic() - t0, evaluations=len(records),
                           final_test_accuracy=records[-1]["test_accuracy"] if records else None,
                           trained_s=training_time(records[-1]) if records else None)
                for t in TARGETS:
                    hit = next((r for r in records if r["test_accuracy"] >= t), None)
                    run["time_to"][f"{t:g}"] = training_time(hit) if hit else None
                if status != "ok":
                    failed = True
                    run["output_tail"] = tail
                    print(f"run {name} #{rep}: {status}; last output:\n{tail}", flush=True)
                else:
                    print(f"run {name} #{rep}: to 95% {run['time_to']['0.95']}, to 98% {run['time_to']['0.98']} "
                          f"(accuracy {run['final_test_accuracy']:.3f} after {run['trained_s']:.1f} s of training, "
                          f"{run['wall_s']:.0f} s wall)", flush=True)
                record["runs"].append(run)
                save(record, configs, args)  # after every run, so a run cut short keeps what it measured
    save(record, configs, args)
    print_table(record, configs)
    return 1 if failed else 0


def reprint(path) -> int:
    """Print the table of a saved record (an older record's wall-time cut-offs, then called failures, count as
    results when the run logged evaluations)."""
    with open(path) as f:
        record = json.load(f)
    configs = list(dict.fromkeys((r["config"], r["kind"], r["n"]) for r in record["runs"]))
    for run in record["runs"]:
        if run["status"].startswith("failed (timed out") and run.get("evaluations"):
            run["note"] = "stopped at the wall-time allowance, " + run["status"].split("after ")[1].rstrip(")")
            run["status"] = "ok"
    summarize(record, configs, argparse.Namespace(ranks=record["ranks"]))
    record.setdefault("load_end", "not recorded")
    print_table(record, configs)
    return 0


def save(record, configs, args):
    """Recompute the summary and rewrite --json-out (the load average at the last save is the one at the end)."""
    record["load_end"] = load_text()
    summarize(record, configs, args)
    if args.json_out:
        with open(args.json_out + ".tmp", "w") as f:
            json.dump(record, f, indent=1)
        os.replace(args.json_out + ".tmp", args.json_out)


if __name__ == "__main__":
    sys.exit(main())
