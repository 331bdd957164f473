"""A small ULFM job: workers accumulate into a ShardedParameters store, a rank dies, the survivors shrink, rebuild
the store and finish; rank 0 then checks the store against the pushes counted by every rank.

Run (Open MPI from PyPI):  mpirun --with-ft ulfm -n 5 python tests/support/ulfm_job.py --scenario worker
Scenarios: none, worker (the last worker SIGKILLs itself mid-round, or at --kill-at), two (two workers die at
different times), server (server rank 1 of --servers 2 dies), stop (the last worker SIGSTOPs itself; rank 0's
heartbeat watch kills it), root (rank 0 dies: the survivors end the job, exit 3, and say how to resume), during
(as worker, and the next-to-last worker SIGKILLs itself inside the survivors' recovery, after the shrink: the
attempt fails on every survivor (``ft.commit``) and they shrink again and rebuild from what they held).

Ranks 0..S-1 host the shards and push nothing; ranks S.. are workers.  Worker w's push adds 1 at slot w of every
shard (a per-shard count of its pushes that landed) and w+1 to every payload entry, so each shard must satisfy
payload == sum_w count[w] * (w+1) exactly, and a shard that was never lost must hold count[w] == pushes counted by
worker w.  Safe points (a polled Ibarrier) come every --per-round pushes; between two of them each worker fetches
its replica while nobody pushes.  Exit 0 and "RESULT ok" when every check passes; with ULFM off (MPICH, or mpirun
without --with-ft) the death ends the job, non-zero, as it always did.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time

import numpy
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from asyncsgd.rma.heartbeats import Heartbeats  # noqa: E402
from asyncsgd.store import ShardedParameters  # noqa: E402
from asyncsgd.store.rebuild import rebuild  # noqa: E402
from asyncsgd.ulfm import primitives as ft  # noqa: E402
from asyncsgd.ulfm.policy import ulfm_enabled  # noqa: E402
from asyncsgd.ulfm.processes import kill_rank  # noqa: E402
from asyncsgd.ulfm.roles import reassign_roles  # noqa: E402

SLOTS = 8  # count slots per shard: worker ids < SLOTS


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--scenario", choices=("none", "worker", "two", "server", "stop", "root", "during"), default="worker")
    p.add_argument("--servers", type=int, default=1)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--kill-round", type=int, default=2, help="the victim dies in the middle of this round")
    p.add_argument("--kill-at", type=int, default=None,
                   help="a worker victim acts after this many of its pushes (0: before its first push; "
                        "rounds*per-round: after its last, before the final safe point); default: mid --kill-round")
    p.add_argument("--notice", choices=("probe", "safe-point"), default="probe",
                   help="probe: check for failures after every push (Iprobe, no synchronisation); safe-point: only "
                        "at the rounds' barriers")
    p.add_argument("--payload", type=int, default=24, help="payload entries per shard (to time bigger rebuilds)")
    p.add_argument("--heartbeat-timeout", type=float, default=20.0)
    p.add_argument("--wait-timeout", type=float, default=60.0, help="bound on every safe point (s)")
    return p.parse_args()


def log(msg):
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def delta_for(wid, bounds, n_params):
    d = numpy.zeros(n_params, numpy.float32)
    for start, stop in bounds:
        d[start + wid] = 1.0
        d[start + SLOTS:stop] = wid + 1
    return d


def victims(args, size):
    """{world rank: (pushes before it acts, signal)} for the scenario."""
    last = size - 1
    mid = args.kill_round * args.per_round + args.per_round // 2 if args.kill_at is None else args.kill_at
    if args.scenario in ("worker", "during"):
        return {last: (mid, signal.SIGKILL)}
    if args.scenario == "two":
        return {last: (mid, signal.SIGKILL), last - 1: (mid + 2 * args.per_round, signal.SIGKILL)}
    if args.scenario == "stop":
        return {last: (mid, signal.SIGSTOP)}
    return {}


def main():
    args = parse()
    world = ft.manage(MPI.COMM_WORLD.Dup())
    t0 = world.bcast(time.monotonic())  # one clock for every rank (CLOCK_MONOTONIC is system-wide on a node)
    enabled = ulfm_enabled()
    S, size = args.servers, world.size
    if size - S > SLOTS or size <= S:
        raise SystemExit(f"ulfm_job: need {S + 1}..{S + SLOTS} ranks")
    n_params = S * (SLOTS + args.payload)
    store = ShardedParameters(world, n_params, n_servers=S)
    bounds = store.bounds
    wid = world.rank - S if world.rank >= S else None  # original worker id, kept across rebuilds
    delta = delta_for(wid, bounds, n_params) if wid is not None else None
    plan = victims(args, size)
    server_victim = (args.scenario == "server" and world.rank == 1) or (args.scenario == "root" and world.rank == 0)
    hb = Heartbeats(world)
    comm = world
    pushes, replica, base = 0, None, 0
    restored_total, lost_total = set(), 0
    if world.rank == 0:
        log(f"ulfm_job: {size} ranks, {S} servers, scenario {args.scenario}, ULFM {'on' if enabled else 'off'}")
        # MPICH's mpiexec names a dead process only by its PID: this line maps it to a rank.
        log("ulfm_job: pids " + " ".join(f"rank{r}={pid}@{host}" for r, (host, pid) in enumerate(hb.where)))

    if not enabled and world.rank == 0:
        _name_the_dead_on_launcher_signal(world, hb.where)

    def watch():
        hb.beat()
        if comm.rank == 0:
            for r in hb.stale(args.heartbeat_timeout):
                killed = kill_rank(hb, r)
                log(f"rank {r} sent no heartbeat for {args.heartbeat_timeout:g} s: "
                    f"{'killed it' if killed else 'cannot kill it (another host)'}")

    def maybe_act():
        act = plan.get(world.rank)
        if act is not None and pushes == act[0]:
            log(f"rank {world.rank}: {signal.Signals(act[1]).name} to itself at {time.monotonic() - t0:.2f} s")
            time.sleep(0.1)  # let the launcher forward the line before the process goes
            os.kill(os.getpid(), act[1])

    rnd = 0
    while True:
        try:
            if rnd == args.rounds:  # the end: every push done and every rank still here
                if wid is not None:
                    maybe_act()
                ft.safe_point(comm, timeout=args.wait_timeout, on_wait=watch)
                break
            if wid is not None:
                for _ in range(args.per_round):
                    maybe_act()
                    try:
                        store.push(delta, base_version=base)
                    except MPI.Exception as exc:  # a push to a dead server over a network transport raises
                        if not ft.is_failure(comm, exc):
                            raise
                        raise ft.RankFailure(comm, exc, "push") from exc
                    pushes += 1
                    hb.beat()
                    if args.notice == "probe":
                        ft.check_failures(comm)  # no synchronisation: a death is noticed at the next push
            else:
                stop_at = time.monotonic() + 0.05
                while time.monotonic() < stop_at:
                    watch()
                    if args.notice == "probe":
                        ft.check_failures(comm)
                    time.sleep(0.005)
                if server_victim and rnd == args.kill_round:
                    log(f"rank {world.rank}: SIGKILL to itself at {time.monotonic() - t0:.2f} s")
                    time.sleep(0.1)
                    os.kill(os.getpid(), signal.SIGKILL)
            ft.safe_point(comm, timeout=args.wait_timeout, on_wait=watch)
            if wid is not None:  # nobody pushes between the two safe points: the replica is a consistent copy
                vec = numpy.empty(n_params, numpy.float32)
                base = store.fetch(vec)
                replica = (vec, base)
            ft.safe_point(comm, timeout=args.wait_timeout, on_wait=watch)
            rnd += 1
        except ft.RankFailure as failure:
            detected = time.monotonic() - t0
            how = "a revoke" if failure.revoked else "a dead rank"
            log(f"rank {world.rank} noticed {how} at {detected:.2f} s ({failure.where})")
            old = comm
            attempt, held, target = 0, None, old
            while True:  # as Recovery.recover: an attempt that a death interrupts is dropped everywhere, retried
                new, _ = ft.survivors(target)
                failed = [r for r, now in ft.rank_map(old, new).items() if now is None]
                if 0 in failed:             # as the trainer: the new rank 0 speaks, every survivor exits 3
                    ft.end_after_root_loss(new, f"rank 0 lost at {detected:.1f} s: it held the monitor; ending "
                                                f"(resume from the last checkpoint with --resume)\n")
                if held is None:  # read after the first shrink: every survivor's pushes had completed
                    held = (store.version() if old.rank == 0 else None,
                            store.local_shard() if store.is_server else None)
                    hb.abandon()
                attempt += 1
                if args.scenario == "during" and attempt == 1 and world.rank == size - 2:
                    log(f"rank {world.rank}: SIGKILL to itself inside the recovery at {time.monotonic() - t0:.2f} s")
                    time.sleep(0.1)
                    os.kill(os.getpid(), signal.SIGKILL)
                roles = reassign_roles(old.size, failed, S)
                ok, rb, hb_new = True, None, None
                try:
                    rb = rebuild(store, old.rank, new, failed, version=held[0], replica=replica,
                                 timeout=args.wait_timeout, local=held[1])
                    hb_new = Heartbeats(new)
                except (ft.RankFailure, MPI.Exception) as exc:
                    if isinstance(exc, MPI.Exception) and not ft.is_failure(new, exc):
                        raise
                    ok = False
                if ft.commit(new, ok):
                    break
                if rb is not None:
                    rb.store.abandon()
                if new.rank == 0:
                    log(f"a rank died during the recovery (attempt {attempt}); shrinking again")
                target = new
            hb = hb_new
            store = rb.store
            restored_total.update(rb.restored)
            lost_total += rb.lost_pushes
            _, _, role = roles[old.rank]
            if role.kind == "server" and wid is not None:
                wid = None  # a worker moved up to host a lost shard: it stops pushing
            # Detection is not uniform (one rank may be a safe point ahead): all resume at the furthest round.
            furthest = numpy.array([rnd], numpy.int64)
            out = numpy.empty(1, numpy.int64)
            ft_wait(new.Iallreduce([furthest, MPI.INT64_T], [out, MPI.INT64_T], op=MPI.MAX), args.wait_timeout)
            rnd = int(out[0])
            comm = new
            if new.rank == 0:
                n_workers = sum(1 for _, _, r in roles.values() if r.kind == "worker")
                for r in failed:
                    if r >= S:
                        log(f"worker {r - S} (rank {r}) lost at {detected:.1f} s; {n_workers} workers continue")
                    else:
                        log(f"server {r} (rank {r}) lost at {detected:.1f} s; shard {r} restored from rank "
                            f"{rb.replica_rank}'s replica; {rb.lost_pushes} pushes lost; {n_workers} workers "
                            f"continue")
                log(f"recovered in {time.monotonic() - t0 - detected:.2f} s (shrink + store rebuild), "
                    f"{new.size} ranks, resuming at round {rnd}")
    final_version = store.version()
    counts = numpy.zeros(SLOTS, numpy.int64)
    if wid is not None:
        counts[wid] = pushes
    elif world.rank >= S:  # a promoted worker: its pushes before the promotion count
        counts[world.rank - S] = pushes
    total = numpy.empty(SLOTS, numpy.int64)
    ft_wait(comm.Iallreduce([counts, MPI.INT64_T], [total, MPI.INT64_T], op=MPI.SUM), args.wait_timeout)
    ok = True
    if comm.rank == 0:
        vec = store.read_all()
        alive_ids = {r - S for r in range(size)} - {r - S for r in plan}
        if args.scenario == "during":
            alive_ids.discard(size - 2 - S)  # died inside the recovery, after an unknown number of its pushes
        landed = None
        for shard, (start, stop) in enumerate(bounds):
            c = vec[start:start + SLOTS].astype(numpy.int64)
            expect = float(numpy.dot(c, numpy.arange(1, SLOTS + 1)))
            if not numpy.all(vec[start + SLOTS:stop] == expect):
                ok = False
                log(f"FAIL shard {shard}: payload {vec[start + SLOTS]} != sum count*(w+1) = {expect}")
            if shard in restored_total:
                continue
            for w in range(size - S):
                if w in alive_ids and c[w] != total[w]:
                    ok = False
                    log(f"FAIL shard {shard}: worker {w} counted {total[w]} pushes, the store holds {c[w]}")
            landed = c
        for r, (after, _) in sorted(plan.items()):
            if landed is not None:
                log(f"worker {r - S} (rank {r}): {landed[r - S]} pushes landed before it died (it acted after "
                    f"{after})")
                if enabled and landed[r - S] != after:
                    ok = False
                    log(f"FAIL worker {r - S}: {landed[r - S]} pushes landed, expected {after}")
        first = vec[bounds[0][0]:bounds[0][0] + SLOTS].astype(numpy.int64).sum()
        if final_version != first:
            ok = False
            log(f"FAIL version {final_version} != pushes landed on shard 0 ({first})")
        for shard in restored_total:
            start = bounds[shard][0]
            held = vec[start:start + SLOTS].astype(numpy.int64).sum()
            if held + lost_total != first:
                ok = False
                log(f"FAIL restored shard {shard}: {held} pushes + {lost_total} lost != {first}")
        log(f"RESULT {'ok' if ok else 'FAIL'}: version {final_version}, {comm.size} ranks left, lost pushes "
            f"{lost_total}, {time.monotonic() - t0:.1f} s")
    store.free()
    flag = numpy.array([1 if ok else 0], numpy.int64)
    res = numpy.empty(1, numpy.int64)
    ft_wait(comm.Iallreduce([flag, MPI.INT64_T], [res, MPI.INT64_T], op=MPI.MIN), args.wait_timeout)
    return 0 if res[0] else 1


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def _name_the_dead_on_launcher_signal(comm, where):
    """Without ULFM: when the launcher signals the survivors (MPICH's ``mpiexec -disable-auto-cleanup`` sends
    SIGUSR1, Open MPI's SIGTERM), name the ranks of this host that are gone and end the job."""
    host = socket.gethostname()

    def handler(signum, frame):
        dead = [r for r, (h, pid) in enumerate(where) if h == host and _gone(pid)]
        names = ", ".join(f"rank {r} (pid {where[r][1]})" for r in dead) or "a rank on another host"
        log(f"ulfm_job: {names} died; ULFM is off, so the job ends (launch with mpirun --with-ft ulfm to run "
            f"through a dead rank)")
        comm.Abort(1)

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, handler)


def ft_wait(request, timeout):
    start = time.monotonic()
    while not request.Test():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"ulfm_job: a collective did not complete within {timeout:.0f} s")
        time.sleep(0.002)


if __name__ == "__main__":
    status = main()
    # like the trainer: after running through a dead rank, leave without MPI_Finalize, which can wait for minutes
    # (once here in CI: "RESULT ok" written, then the 130 s job timeout)
    ft.end_after_failures(status)
    sys.exit(status)
