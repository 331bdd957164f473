"""Synchronous data parallelism for comparison: every rank computes a gradient, one Allreduce averages them.

All ranks are replicas (there is no parameter store); rank 0 also evaluates and reports.  The stop decision rides
in the same reduction (one extra element), so no rank ever waits in a second collective.
"""
from __future__ import annotations

import time

import numpy
from mpi4py import MPI

from ..data import BatchStream
from ..data.augment import make_augmenter
from ..faults import fault_point
from ..mpiutil import wait
from .common import Evaluations, StopRule, TrainingSplit, schedule_budget, sgd_defaults
from .resume import Checkpointer

__all__ = ["run"]


def run(comm, net, src, cfg, stop, backend, reporter, *, model_name="model", checkpointer=None, resume=None):
    """Train ``net`` with all-reduce SGD (SGDOptions ``cfg``) on every rank of ``comm`` until ``stop``; return the
    summary dict on rank 0.

    ``resume`` is a loaded checkpoint to continue from (every rank gets it), or None.
    """
    cfg, stop_opts = sgd_defaults(cfg, stop, model_name, sync_replicas=comm.size)  # peak lr x sqrt(replicas)
    comm = comm.Dup()
    xp = backend.xp
    size, rank = comm.size, comm.rank
    split = TrainingSplit(src, cfg.validation, cfg.seed)  # the same on every rank
    x, y = split.share(rank, size)
    # every replica must apply the same rate: it comes from rank-independent numbers (the step count, the global
    # batch, rank 0's clock carried in the all-reduce), never from a rank's own slice or clock
    schedule, budget = schedule_budget(cfg, stop_opts, n_train=split.n_train, workers=size)
    velocity = xp.zeros_like(net.params)
    steps = 0
    if resume is not None:  # every replica holds the same parameters and momentum in this mode
        net.params[...] = backend.to_device(resume.params)
        velocity[...] = backend.to_device(resume.state["momentum"])
        steps = int(resume.data_position["steps"])
    stream = BatchStream(x, y, cfg.batch_size, seed=cfg.seed + 1000 + rank + steps)
    rng = numpy.random.default_rng(cfg.seed + 2000 + rank + steps)
    checkpointer = checkpointer or Checkpointer(None, net.n_params, {"seed": cfg.seed})
    augment = make_augmenter(cfg.augment, src, seed=cfg.seed + 3000 + rank + steps)
    evaluate = None
    if rank == 0:
        # the replica evaluates its own parameters: every replica holds the same ones after each step
        evaluate = Evaluations(net, split, backend, patience=stop.patience, selection_margin=cfg.selection_margin)
    n = net.n_params
    send = numpy.zeros(n + 3, dtype=numpy.float32)  # gradient, loss, stop vote, rank 0's clock (others 0)
    recv = numpy.empty_like(send)
    stop = StopRule(stop_opts, samples_per_epoch=len(y))
    samples = steps * cfg.batch_size
    start_steps = steps
    last_eval = time.monotonic()
    accuracy = test_loss = loss_ewma = None
    comm_s = 0.0
    lr = schedule.lr
    for xb, yb in stream:
        fault_point("step")
        loss = net.loss_and_grad(backend.to_device(augment(xb)), backend.to_device(yb), rng=rng)
        backend.to_host(net.grads, out=send[:n])
        send[n] = loss
        steps += 1
        samples += len(yb)
        want_stop = stop.done(samples, steps)
        if rank == 0 and time.monotonic() - last_eval >= cfg.eval_every:
            figures = evaluate(backend.to_host(net.params), time=stop.elapsed(), samples=samples * size,
                               steps=steps - 1)
            last_eval = time.monotonic()
            want_stop = want_stop or stop.done(samples, steps, evaluate.deciding_accuracy)
            if evaluate.should_stop:
                want_stop = stop.stop_early()
            if reporter is not None:
                el = stop.elapsed()
                reporter.record({"time": el, "samples": samples * size, "steps": steps, "loss": loss_ewma,
                                 **figures, "lr": lr,
                                 "samples_per_s": samples * size / el,
                                 "per_worker_samples_per_s": [samples / el] * size,
                                 "fraction_done": stop.fraction(samples, steps)})
        send[n + 1] = 1.0 if want_stop else 0.0
        send[n + 2] = stop.elapsed() if rank == 0 else 0.0
        t0 = time.perf_counter()
        wait(comm.Iallreduce(send, recv, op=MPI.SUM), what="gradient all-reduce")
        comm_s += time.perf_counter() - t0
        if budget is not None:  # the position before this step, from numbers every rank shares
            lr = schedule.rate(budget.fraction((steps - 1) * size * cfg.batch_size, float(recv[n + 2])))
        mean_grad = backend.to_device(recv[:n] / size)
        backend.sgd_update(net.params, mean_grad, lr=lr, momentum=cfg.momentum, velocity=velocity)  # fused on GPU
        mean_loss = float(recv[n]) / size
        loss_ewma = mean_loss if loss_ewma is None else 0.95 * loss_ewma + 0.05 * mean_loss
        if not numpy.isfinite(mean_loss):
            raise FloatingPointError(f"loss became {mean_loss} at step {steps}: lower --lr (now {lr:.3g}, "
                                     f"peak {cfg.lr})")
        stopping = recv[n + 1] > 0
        if rank == 0 and (checkpointer.due() or (stopping and checkpointer.path)):
            checkpointer.save(params=backend.to_host(net.params), state={"momentum": backend.to_host(velocity)},
                              version=steps, data_position={"steps": steps})
        if stopping:
            break
    fault_point("end")
    wall = stop.elapsed()
    result = None
    if rank == 0:
        last_params = backend.to_host(net.params)
        figures = evaluate(last_params, time=wall, samples=samples * size, steps=steps)
        test_loss, accuracy = figures["test_loss"], figures["test_accuracy"]
        if reporter is not None:
            reporter.record({"time": wall, "samples": samples * size, "steps": steps, "loss": loss_ewma,
                             **figures, "lr": lr,
                             "samples_per_s": samples * size / wall, "per_worker_samples_per_s": [samples / wall] * size})
        result = evaluate.finish({"mode": "sync", "model": model_name, "data": src.name, "workers": size, "servers": 0,
                  "test_accuracy": accuracy, "test_loss": test_loss, "final_loss": loss_ewma,
                  "samples": samples * size, "steps": steps,
                  "samples_per_s": (steps - start_steps) * cfg.batch_size * size / wall, "wall_s": wall,
                  "epochs": samples * size / split.n_train, "allreduce_s": comm_s, "stop_reason": stop.reason,
                  "checkpoints": checkpointer.written,
                  "per_worker_samples_per_s": [samples / wall] * size, "n_params": int(n),
                  "layout": net.param_layout(), "lr_schedule": str(schedule), "final_lr": lr}, last_params)
    comm.Free()
    return result
