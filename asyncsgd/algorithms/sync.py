"""Synchronous data parallelism for comparison: every rank computes a gradient, one Allreduce averages them.

All ranks are replicas (there is no parameter store); rank 0 also evaluates and reports.  The stop decision rides
in the same reduction (one extra element), so no rank ever waits in a second collective.

Under ``mpirun --with-ft ulfm`` (``fault_tolerance``, docs/FAULT_TOLERANCE.md) a dead rank makes the all-reduce
raise; the survivors shrink (``sync_recovery.ReplicaGuard``), adopt rank 0's parameters, momentum and counters (the
last step every rank may not have finished alike), re-slice the training rows among themselves and go on.
"""
from __future__ import annotations

import time

import numpy
from mpi4py import MPI

from asyncsgd.data import BatchStream
from asyncsgd.data.augment import make_augmenter
from asyncsgd.runtime.faults import fault_point
from asyncsgd.runtime.mpi import polled_barrier, wait
from asyncsgd.algorithms.common import Evaluations, StopRule, TrainingSplit, options_as_trained, schedule_budget
from asyncsgd.algorithms.resume import Checkpointer
from asyncsgd.ulfm.replica_guard import ReplicaGuard

__all__ = ["run"]


def run(comm, net, src, opts, stop, backend, reporter, *, plan=None, model_name="model", checkpointer=None,
        resume=None):
    """Train ``net`` with all-reduce SGD (SGDOptions ``opts``) on every rank of ``comm`` until ``stop``; return the
    summary dict on rank 0.

    ``plan`` is the run's RunPlan (asyncsgd.plan; made here from the arguments when None): its ``options`` carry
    the model's defaults (the peak rate x sqrt(replicas)) and ``fault_tolerant`` says whether the replicas run
    through a dead rank.  ``resume`` is a loaded checkpoint to continue from (every rank gets it), or None.
    """
    if plan is None:
        from asyncsgd.plan import plan_for
        plan = plan_for("sync", comm, src, opts, stop, model_name=model_name, resumed=resume is not None)
    opts, stop_opts = plan.options, plan.stop
    comm = comm.Dup()
    xp = backend.xp
    size = n_start = comm.size
    split = TrainingSplit(src, opts.validation, opts.seed)  # the same on every rank
    # every replica must apply the same rate: it comes from rank-independent numbers (the global sample count, rank
    # 0's clock carried in the all-reduce), never from a rank's own slice or clock
    schedule, budget = schedule_budget(opts, stop_opts, n_train=split.n_train, workers=size)
    velocity = xp.zeros_like(net.params)
    steps = 0
    if resume is not None:  # every replica holds the same parameters and momentum in this mode
        net.params[...] = backend.to_device(resume.params)
        velocity[...] = backend.to_device(resume.state["momentum"])
        steps = int(resume.data_position["steps"])
    checkpointer = checkpointer or Checkpointer(None, net.n_params, {"seed": opts.seed})
    evaluate = None
    if comm.rank == 0:
        # the replica evaluates its own parameters: every replica holds the same ones after each step
        evaluate = Evaluations(net, split, backend, patience=stop_opts.patience, selection_margin=opts.selection_margin)
    n = net.n_params
    send = numpy.zeros(n + 3, dtype=numpy.float32)  # gradient, loss, stop vote, rank 0's clock (others 0)
    recv = numpy.empty_like(send)
    samples = steps * opts.batch_size  # this replica's, for its stop rule (epochs of its share)
    g_samples = samples * size  # the job's: every rank counts the same (batches are always full)
    start_samples = g_samples
    replica = _Replica(split, opts, stop_opts, comm.rank, size, steps)
    stop = replica.stop
    # one start for every rank (rank 0 built its evaluator first): --kill-ranks and the log's times agree
    polled_barrier(comm)
    stop.start = time.monotonic()
    guard = ReplicaGuard(comm, enabled=plan.fault_tolerant, start=stop.start, reporter=reporter,
                         kill_ranks=opts.kill_ranks, root_lost_hint=_resume_hint(checkpointer.path))
    guard.arm_kill(opts.kill_ranks.get(comm.rank))
    last_eval = time.monotonic()
    accuracy = test_loss = loss_ewma = None
    comm_s = 0.0
    lr = schedule.lr
    stopping = False
    while True:
        try:
            if stopping:
                guard.final_meet()  # with fault tolerance: a survivor still training may need this rank back
                break
            comm = guard.comm
            size, rank = comm.size, comm.rank
            xb, yb = next(replica.batches)
            fault_point("step")
            loss = net.loss_and_grad(backend.to_device(replica.augment(xb)), backend.to_device(yb), rng=replica.rng)
            backend.to_host(net.grads, out=send[:n])
            send[n] = loss
            # the step's counters commit only after its all-reduce: a failure there leaves them (and the
            # parameters) at the last completed step, the state a recovery adopts from rank 0
            steps_next, samples_next, g_next = steps + 1, samples + len(yb), g_samples + len(yb) * size
            want_stop = stop.done(samples_next, steps_next)
            if rank == 0 and time.monotonic() - last_eval >= opts.eval_every:
                figures = evaluate(backend.to_host(net.params), time=stop.elapsed(), samples=g_next, steps=steps)
                last_eval = time.monotonic()
                want_stop = want_stop or stop.done(samples_next, steps_next, evaluate.deciding_accuracy)
                if evaluate.should_stop:
                    want_stop = stop.stop_early()
                if reporter is not None:
                    el = stop.elapsed()
                    reporter.record({"time": el, "samples": g_next, "steps": steps_next, "loss": loss_ewma,
                                     **figures, "lr": lr,
                                     "samples_per_s": g_next / el,
                                     "per_worker_samples_per_s": [samples_next / el] * size,
                                     "fraction_done": stop.fraction(samples_next, steps_next)})
            send[n + 1] = 1.0 if want_stop else 0.0
            send[n + 2] = stop.elapsed() if rank == 0 else 0.0
            t0 = time.perf_counter()
            wait(comm.Iallreduce(send, recv, op=MPI.SUM), what="gradient all-reduce")
            comm_s += time.perf_counter() - t0
            if budget is not None:  # the position before this step, from numbers every rank shares
                lr = schedule.rate(budget.fraction(g_samples, float(recv[n + 2])))
            mean_grad = backend.to_device(recv[:n] / size)
            backend.sgd_update(net.params, mean_grad, lr=lr, momentum=opts.momentum, velocity=velocity)  # fused on GPU
            steps, samples, g_samples = steps_next, samples_next, g_next
            mean_loss = float(recv[n]) / size
            loss_ewma = mean_loss if loss_ewma is None else 0.95 * loss_ewma + 0.05 * mean_loss
            if not numpy.isfinite(mean_loss):
                raise FloatingPointError(f"loss became {mean_loss} at step {steps}: lower --lr (now {lr:.3g}, "
                                         f"peak {opts.lr})")
            stopping = bool(recv[n + 1] > 0)
            if rank == 0:
                guard.stepped()
            if rank == 0 and (checkpointer.due() or (stopping and checkpointer.path)):
                checkpointer.save(params=backend.to_host(net.params), state={"momentum": backend.to_host(velocity)},
                                  version=steps, data_position={"steps": steps})
        except Exception as exc:
            if not guard.is_failure(exc):
                guard.end_if_failure(exc)
                raise
            state = None
            if guard.comm.rank == 0:
                state = {"params": backend.to_host(net.params).copy(), "momentum": backend.to_host(velocity).copy(),
                         "steps": steps, "g_samples": g_samples, "loss_ewma": loss_ewma, "lr": lr,
                         "stopping": stopping, "reason": stop.reason}
            state = guard.recover(state)
            net.params[...] = backend.to_device(state["params"])
            velocity[...] = backend.to_device(state["momentum"])
            steps, g_samples, loss_ewma, lr = state["steps"], state["g_samples"], state["loss_ewma"], state["lr"]
            stopping = state["stopping"]
            size = guard.comm.size
            # the dead rank's share is taken over: the training rows are re-sliced among the survivors
            replica = _Replica(split, opts, stop_opts, guard.comm.rank, size, steps, recoveries=guard.recoveries,
                               start=stop.start)
            stop = replica.stop
            stop.reason = state["reason"]
            samples = g_samples // size  # this replica's position in epochs of its new share
    fault_point("end")
    comm = guard.comm
    size = comm.size
    wall = stop.elapsed()
    result = None
    if comm.rank == 0:
        last_params = backend.to_host(net.params)
        figures = evaluate(last_params, time=wall, samples=g_samples, steps=steps)
        test_loss, accuracy = figures["test_loss"], figures["test_accuracy"]
        rate = (g_samples - start_samples) / wall
        if reporter is not None:
            reporter.record({"time": wall, "samples": g_samples, "steps": steps, "loss": loss_ewma,
                             **figures, "lr": lr,
                             "samples_per_s": g_samples / wall, "per_worker_samples_per_s": [samples / wall] * size})
        result = evaluate.finish({"mode": "sync", "model": model_name, "data": src.name, "workers": n_start,
                  "servers": 0,
                  "test_accuracy": accuracy, "test_loss": test_loss, "final_loss": loss_ewma,
                  "samples": g_samples, "steps": steps,
                  "samples_per_s": rate, "wall_s": wall,
                  "epochs": g_samples / split.n_train, "allreduce_s": comm_s, "stop_reason": stop.reason,
                  "checkpoints": checkpointer.written,
                  "per_worker_samples_per_s": [samples / wall] * size, "n_params": int(n),
                  "layout": net.param_layout(), "lr_schedule": str(schedule), "final_lr": lr,
                  **options_as_trained(opts),
                  **guard.summary()}, last_params)
    guard.free()
    return result


class _Replica:
    """One replica's share of the training rows and its streams (batches, dropout, augmentation), and its stop
    rule (epochs count this share); built again on the survivors after a recovery (a new share)."""

    def __init__(self, split, opts, stop_opts, rank: int, size: int, steps: int, *, recoveries: int = 0,
                 start=None):
        x, y = split.share(rank, size)
        # seeds as before a failure; after one, also by the recovery count, so a survivor draws fresh batches
        seed = rank + steps + 7919 * recoveries
        self.batches = iter(BatchStream(x, y, opts.batch_size, seed=opts.seed + 1000 + seed))
        self.rng = numpy.random.default_rng(opts.seed + 2000 + seed)
        self.augment = make_augmenter(opts.augment, split.src, seed=opts.seed + 3000 + seed)
        self.stop = StopRule(stop_opts, samples_per_epoch=len(y), start=start)


def _resume_hint(path) -> str:
    if path:
        return (f"the last checkpoint, {path}, is intact: continue with the same command plus --resume {path}")
    return "no checkpoint was being written (add --checkpoint-every SECONDS to be able to --resume)"
