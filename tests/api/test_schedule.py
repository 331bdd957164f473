"""Tests of asyncsgd.schedule: schedule shapes, the --lr-schedule grammar, run budgets and Downpour's global progress.

The serial tests need no MPI.  ``test_workers_apply_the_same_rate_at_the_same_store_version`` runs under mpiexec
with 2+ ranks against the real parameter store (``tests/run_tests.py --only mpi --ranks 3 -k same_rate``).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from asyncsgd.schedule import (Constant, Cosine, Linear, RunBudget, StepDecay, Warmup, WARMUP_START,
                               global_progress, parse_schedule)

LR = 0.01


# ------------------------------------------------------------------ shapes

def test_constant_is_todays_rate_everywhere():
    s = parse_schedule("constant", lr=LR)
    assert [s.rate(p) for p in (0, 0.3, 1)] == [LR, LR, LR]
    assert s.is_constant and s(0.5) == LR


def test_cosine_runs_from_lr_to_floor_through_the_midpoint():
    s = Cosine(lr=LR)
    assert s.rate(0) == pytest.approx(LR)
    assert s.rate(0.5) == pytest.approx(LR / 2)
    assert s.rate(1) == pytest.approx(0, abs=1e-15)
    floor = Cosine(lr=LR, floor=0.1)
    assert floor.rate(1) == pytest.approx(0.1 * LR)
    rates = [s.rate(p) for p in np.linspace(0, 1, 50)]
    assert all(b <= a for a, b in zip(rates, rates[1:])), "cosine decay must never rise"
    assert not s.is_constant


def test_linear_decay_is_a_straight_line():
    s = Linear(lr=LR, floor=0.2)
    assert s.rate(0) == pytest.approx(LR)
    assert s.rate(0.5) == pytest.approx(0.6 * LR)
    assert s.rate(1) == pytest.approx(0.2 * LR)


def test_step_decay_multiplies_at_each_milestone_reached():
    s = StepDecay(lr=LR, gamma=0.1, milestones=(0.5, 0.75))
    assert s.rate(0.49) == pytest.approx(LR)
    assert s.rate(0.5) == pytest.approx(LR * 0.1)
    assert s.rate(0.74) == pytest.approx(LR * 0.1)
    assert s.rate(0.75) == pytest.approx(LR * 0.01)
    assert s.rate(1.0) == pytest.approx(LR * 0.01)


def test_warmup_ramps_linearly_then_follows_the_decay_unshifted():
    s = Warmup(Cosine(lr=LR), fraction=0.1)
    assert s.rate(0) == pytest.approx(WARMUP_START * LR)
    assert s.rate(0.05) == pytest.approx((WARMUP_START + (1 - WARMUP_START) * 0.5) * Cosine(lr=LR).rate(0.05))
    for p in (0.1, 0.4, 0.9, 1.0):   # after the warm-up: the decay at the run's own progress
        assert s.rate(p) == pytest.approx(Cosine(lr=LR).rate(p))
    ramp = [s.rate(p) for p in np.linspace(0, 0.1, 11)]
    assert all(b > a for a, b in zip(ramp, ramp[1:])), "the warm-up must rise"
    assert s.lr == LR


def test_progress_outside_the_run_is_clipped_and_nan_refused():
    s = Cosine(lr=LR)
    assert s.rate(-0.5) == s.rate(0) and s.rate(7) == s.rate(1)
    with pytest.raises(ValueError, match="progress is NaN"):
        s.rate(float("nan"))


def test_schedules_are_frozen_and_with_lr_changes_only_the_peak():
    s = parse_schedule("warmup:0.05+step:0.5@0.5")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.fraction = 0.2
    t = s.with_lr(0.004)
    assert t.lr == 0.004 and s.lr == 1.0
    assert t.rate(0.6) == pytest.approx(0.004 * 0.5)
    assert str(t) == str(s)
    # numpy scalars (a rate or a fraction computed with numpy) are accepted
    assert parse_schedule("cosine", lr=np.float32(0.004), warmup=np.float64(0.05)).rate(np.float32(1)) == 0


# ------------------------------------------------------------------ grammar

@pytest.mark.parametrize("spec,expected", [
    ("constant", Constant(lr=LR)),
    ("cosine", Cosine(lr=LR)),
    ("cosine:0.05", Cosine(lr=LR, floor=0.05)),
    ("linear:0.1", Linear(lr=LR, floor=0.1)),
    ("step:0.1@0.5,0.75", StepDecay(lr=LR, gamma=0.1, milestones=(0.5, 0.75))),
    ("warmup:0.05+cosine", Warmup(Cosine(lr=LR), fraction=0.05)),
    ("warmup:0.1", Warmup(Constant(lr=LR), fraction=0.1)),
    (" Warmup:0.05 + STEP:0.5@0.5 ", Warmup(StepDecay(lr=LR, gamma=0.5, milestones=(0.5,)), fraction=0.05)),
    ("warmup:0+cosine", Cosine(lr=LR)),
])
def test_grammar_builds_the_documented_schedule_and_prints_back(spec, expected):
    s = parse_schedule(spec, lr=LR)
    assert s == expected
    assert parse_schedule(str(s), lr=LR) == s       # str() is a valid spec: logs and --print-config round-trip


def test_warmup_option_equals_the_prefix_and_may_not_be_given_twice():
    assert parse_schedule("cosine", lr=LR, warmup=0.05) == parse_schedule("warmup:0.05+cosine", lr=LR)
    assert parse_schedule("cosine", lr=LR, warmup=0.0) == Cosine(lr=LR)
    with pytest.raises(ValueError, match="warmup is given twice"):
        parse_schedule("warmup:0.05+cosine", warmup=0.1)


@pytest.mark.parametrize("spec,match", [
    ("", "empty"),
    ("cos", "unknown schedule 'cos'"),
    ("constant:2", "unknown schedule"),
    ("step:0.5", "step needs GAMMA@M1"),
    ("step:2@0.5", "step gamma must be in \\(0, 1\\]"),
    ("step:0@0.5", "step gamma must be in \\(0, 1\\]"),
    ("step:0.5@0.7,0.5", "strictly increasing"),
    ("step:0.5@1", "step milestone must be in \\(0, 1\\)"),
    ("step:0.5@", "step milestone must be a number"),
    ("cosine:x", "cosine floor must be a number"),
    ("cosine:1.5", "cosine floor must be in \\[0, 1\\]"),
    ("linear:-0.1", "linear floor must be in"),
    ("cosine:inf", "cosine floor must be finite"),
    ("warmup:1+cosine", "warmup must be in \\[0, 1\\)"),
    ("warmup:-0.1+cosine", "warmup must be in"),
    ("warmup:0.1+", "nothing after"),
    ("cosine+warmup:0.1", "only a warm-up may come before"),
    ("warmup:0.1+warmup:0.1+cosine", "one decay at most"),
])
def test_bad_specs_name_the_wrong_part(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_schedule(spec)


def test_bad_constructor_arguments_name_the_field():
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        Constant(lr=0)
    with pytest.raises(ValueError, match="lr must be"):
        parse_schedule("cosine", lr=float("nan"))
    with pytest.raises(ValueError, match="step milestones must name at least one"):
        StepDecay(lr=LR, milestones=())
    with pytest.raises(ValueError, match="warm-up inner schedule"):
        Warmup(Warmup(Constant()), fraction=0.1)
    with pytest.raises(ValueError, match="lr schedule must be a string"):
        parse_schedule(None)


# ------------------------------------------------------------------ budgets and progress

def test_budget_from_epochs_steps_and_time():
    assert RunBudget.from_limits(n_train=2700, batch_size=32, epochs=30).total_samples == 81000
    # steps are per worker: 100 steps x 5 workers x 32
    assert RunBudget.from_limits(n_train=2700, batch_size=32, workers=5, steps=100).total_samples == 16000
    both = RunBudget.from_limits(n_train=2700, batch_size=32, workers=5, epochs=30, steps=100)
    assert both.total_samples == 16000, "the nearer limit ends the run, so it defines progress"
    timed = RunBudget.from_limits(n_train=2700, batch_size=32, time_limit=60.0)
    assert timed.total_samples is None and timed.fraction(elapsed=15.0) == pytest.approx(0.25)
    mixed = RunBudget(total_samples=1000, time_limit=10.0)
    assert mixed.fraction(samples=100, elapsed=5.0) == pytest.approx(0.5)
    assert mixed.fraction(samples=900, elapsed=1.0) == pytest.approx(0.9)
    assert mixed.fraction(samples=5000, elapsed=0.0) == 1.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "needs the run's length"),
    (dict(total_samples=0), "total_samples must be an integer >= 1"),
    (dict(time_limit=-1.0), "time_limit must be a number of seconds > 0"),
])
def test_bad_budgets_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RunBudget(**kwargs)


def test_global_progress_counts_every_workers_pushes():
    budget = RunBudget(total_samples=32 * 4 * 100)
    # 100 pushes of 4 steps of 32 samples, by anyone, are the whole run
    assert global_progress(0, budget, batch_size=32, n_push=4) == 0
    assert global_progress(50, budget, batch_size=32, n_push=4) == pytest.approx(0.5)
    assert global_progress(np.int64(100), budget, batch_size=32, n_push=4) == 1.0
    assert global_progress(250, budget, batch_size=32, n_push=4) == 1.0       # clipped
    # a resumed run adds the samples done before (the counter restarts at 0)
    assert global_progress(25, budget, batch_size=32, n_push=4, samples_before=32 * 4 * 25) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="pushes_seen must be an integer >= 0"):
        global_progress(-1, budget, batch_size=32, n_push=4)
    with pytest.raises(ValueError, match="n_push must be an integer >= 1"):
        global_progress(1, budget, batch_size=32, n_push=0)


def test_asynchronous_workers_decay_together_by_global_progress():
    """Simulate 2 workers at different speeds sharing one version counter: same version -> same rate.

    A schedule driven by each worker's own step count would leave the slow worker at a high rate while the fast one
    has decayed; driven by the store's version, both follow one curve.
    """
    schedule = parse_schedule("warmup:0.05+cosine", lr=LR)
    batch, n_push, total_pushes = 32, 1, 200
    budget = RunBudget(total_samples=batch * n_push * total_pushes)
    version = 0
    seen = {0: [], 1: []}          # worker -> [(version at fetch, rate applied, own steps)]
    steps = {0: 0, 1: 0}
    # worker 0 takes 3 steps for each step of worker 1; each step: fetch (read version), apply rate, push
    for tick in range(total_pushes):
        worker = 1 if tick % 4 == 3 else 0
        rate = schedule.rate(global_progress(version, budget, batch_size=batch, n_push=n_push))
        seen[worker].append((version, rate, steps[worker]))
        steps[worker] += 1
        version += 1                # the push takes a ticket
    # both workers then fetch the same final version
    for worker in (0, 1):
        rate = schedule.rate(global_progress(version, budget, batch_size=batch, n_push=n_push))
        seen[worker].append((version, rate, steps[worker]))
    by_version = {}
    for worker in (0, 1):
        for v, rate, _ in seen[worker]:
            by_version.setdefault(v, set()).add(rate)
    assert all(len(rates) == 1 for rates in by_version.values())
    last0, last1 = seen[0][-1], seen[1][-1]
    assert last0[0] == last1[0] and last0[1] == last1[1]
    assert last0[2] != last1[2], "the workers took different numbers of steps"
    # a per-worker schedule (own steps / an even share of 100 steps each) would have disagreed at that moment
    own = [schedule.rate(s[2] * 2 / total_pushes) for s in (last0, last1)]
    assert not math.isclose(own[0], own[1])


# ------------------------------------------------------------------ the real store, 2+ ranks

@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120, method="thread")
def test_workers_apply_the_same_rate_at_the_same_store_version():
    """Every rank pushes a different number of times to a real ShardedParameters; after each fetch it computes the
    rate from the version it saw.  Ranks that saw the same version applied the same rate, and at the shared final
    fetch every rank applies one rate though their own step counts differ."""
    from mpi4py import MPI
    from asyncsgd.runtime.mpi import polled_barrier
    from asyncsgd.store import ShardedParameters

    comm = MPI.COMM_WORLD.Dup()
    rank, size = comm.rank, comm.size
    schedule = parse_schedule("warmup:0.1+cosine", lr=LR)
    batch, n_push = 8, 2
    my_pushes = 2 + 3 * rank                       # ranks take different numbers of steps
    total_pushes = sum(2 + 3 * r for r in range(size))
    budget = RunBudget(total_samples=2 * batch * n_push * total_pushes)   # the final fetch is at half the run
    n = 16
    params = np.zeros(n, dtype=np.float32)
    records = []
    with ShardedParameters(comm, n, n_servers=1, initial=np.zeros(n, dtype=np.float32)) as store:
        polled_barrier(comm)
        for _ in range(my_pushes):
            version = store.fetch(params)
            rate = schedule.rate(global_progress(version, budget, batch_size=batch, n_push=n_push))
            records.append((version, rate))
            store.push(np.full(n, rate, dtype=np.float32), base_version=version)   # "apply" the rate
        polled_barrier(comm)
        final_version = store.fetch(params)
        final_rate = schedule.rate(global_progress(final_version, budget, batch_size=batch, n_push=n_push))
        polled_barrier(comm)
    everyone = comm.allgather((records, final_version, final_rate, my_pushes, float(params[0])))
    comm.Free()
    by_version = {}
    for recs, *_ in everyone:
        for v, r in recs:
            by_version.setdefault(v, set()).add(r)
    assert all(len(rates) == 1 for rates in by_version.values()), by_version
    assert {fv for _, fv, _, _, _ in everyone} == {total_pushes}
    assert len({fr for _, _, fr, _, _ in everyone}) == 1
    assert everyone[0][2] == pytest.approx(schedule.rate(0.5))
    assert len({p for _, _, _, p, _ in everyone}) == size, "ranks took different numbers of steps"
    # what the store accumulated is the sum of the rates the ranks applied (float32)
    applied = sum(r for recs, *_ in everyone for _, r in recs)
    assert everyone[0][4] == pytest.approx(applied, rel=1e-5)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120, method="thread")
def test_two_downpour_workers_apply_the_same_rate_at_the_same_global_step():
    """Real DownpourWorker objects (the trainer's code path: fetch() sets worker.lr from the store version, step()
    applies it) on every rank of a real store: ranks take different numbers of steps, yet whenever two workers
    fetched the same version they hold the same rate, and after the last pushes every worker fetches one version
    and applies schedule.rate(global progress) with its own step count different."""
    from mpi4py import MPI
    from asyncsgd import DownpourOptions
    from asyncsgd.algorithms.downpour.worker import DownpourWorker
    from asyncsgd.api import build_network
    from asyncsgd.backends import select_ops
    from asyncsgd.data import BatchStream, open_source
    from asyncsgd.runtime.mpi import polled_barrier
    from asyncsgd.store import ShardedParameters

    comm = MPI.COMM_WORLD.Dup()
    rank, size = comm.rank, comm.size
    batch, n_push = 8, 1
    cfg = DownpourOptions(lr=LR, momentum=0.9, batch_size=batch, n_push=n_push, lr_schedule="warmup:0.1+cosine")
    src = open_source("synthetic:200")
    backend = select_ops("cpu", 0)
    net = build_network("logreg", src.input_shape, src.n_classes, backend, seed=0)
    my_steps = 3 + 4 * rank
    total = sum(3 + 4 * r for r in range(size))
    budget = RunBudget(total_samples=2 * total * batch * n_push)     # the final fetch lands at half the run
    x, y = src.train_slice(rank, size)
    stream = iter(BatchStream(x, y, batch, seed=rank))
    records = []
    with ShardedParameters(comm, net.n_params, n_servers=1, initial=net.params.copy()) as store:
        worker = DownpourWorker(cfg, net, store, backend, seed=rank, budget=budget)
        assert worker.lr == pytest.approx(LR * WARMUP_START)
        polled_barrier(comm)
        for _ in range(my_steps):
            worker.fetch()
            records.append((worker.base_version, worker.lr))
            worker.step(*next(stream))
            worker.steps += 1
            worker.push()
        polled_barrier(comm)
        worker.fetch()
        final = (worker.base_version, worker.lr, worker.steps)
        polled_barrier(comm)
    everyone = comm.allgather((records, final))
    comm.Free()
    by_version = {}
    for recs, _ in everyone:
        for v, r in recs:
            by_version.setdefault(v, set()).add(r)
    assert all(len(rates) == 1 for rates in by_version.values()), by_version
    assert len(by_version) > my_steps or size == 1
    finals = [f for _, f in everyone]
    assert {f[0] for f in finals} == {total}
    assert len({f[1] for f in finals}) == 1
    assert finals[0][1] == pytest.approx(cfg.lr_schedule.with_lr(LR).rate(0.5))
    assert len({f[2] for f in finals}) == size, "workers took different numbers of steps"
    # the rate fell between the first fetch and the last (warm-up then decay; a constant rate would not move)
    assert finals[0][1] != records[0][1]


# ------------------------------------------------------------------ sync's default peak rate
def test_sync_default_peak_rate_grows_with_the_square_root_of_the_replicas():
    """sgd_defaults: serial keeps the model's rate, W all-reduce replicas get it x sqrt(W) (an explicit --lr is
    kept), and Downpour's own scaling is unchanged."""
    from asyncsgd import DownpourOptions, SGDOptions, Stop
    from asyncsgd.plan import sgd_defaults
    base = sgd_defaults(SGDOptions(), Stop(), "speech_cnn")[0].lr
    assert base == 0.01
    for w in (1, 2, 4, 9):
        lr = sgd_defaults(SGDOptions(), Stop(), "speech_cnn", sync_replicas=w)[0].lr
        assert lr == pytest.approx(0.01 * math.sqrt(w))
    assert sgd_defaults(SGDOptions(lr=0.003), Stop(), "speech_cnn", sync_replicas=4)[0].lr == 0.003
    assert sgd_defaults(DownpourOptions(batch_size=32), Stop(), "speech_cnn", async_replicas=5)[0].lr == \
        pytest.approx(0.006)


def test_sync_run_applies_the_scaled_default_rate(tmp_path):
    """Through the CLI under mpiexec: `--mode sync` on 3 ranks without --lr logs and reports 0.01 x sqrt(3)."""
    import json

    from asyncsgd.testing.launch import run_mpi
    from jobs import TRAIN
    from paths import REPO, repo_env
    run = tmp_path / "run"
    proc = run_mpi(3, TRAIN + ["--mode", "sync", "--data", "synthetic:300", "--steps", "3", "--lr-schedule",
                               "constant", "--progress", "none", "--run-dir", str(run)],
                   timeout=240, cwd=REPO, env=repo_env())
    assert proc.returncode == 0, proc.stdout[-3000:]
    s = json.loads((run / "summary.json").read_text())
    assert s["final_lr"] == pytest.approx(0.01 * math.sqrt(3))
    rates = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert rates and all(r == pytest.approx(0.01 * math.sqrt(3)) for r in rates)
