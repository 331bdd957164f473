"""Downpour's run on every rank: the plan's roles (servers 0..S-1, rank 0 the monitor too, the rest workers), the
parameter store and job board set up, the warm start and the loops of ``worker`` and ``monitor`` started, the
summary built on rank 0, the store freed together (or run through a failure by ``recovery``)."""
from __future__ import annotations

import socket
import time

from asyncsgd.algorithms.common import TrainingSplit, options_as_trained, schedule_budget
from asyncsgd.algorithms.downpour.monitor import checkpoint, monitor_loop, percentile_from_hist
from asyncsgd.algorithms.downpour.recovery import Recovery
from asyncsgd.algorithms.downpour.worker import worker_loop
from asyncsgd.algorithms.resume import Checkpointer
from asyncsgd.rma.board import JobBoard
from asyncsgd.runtime.faults import fault_point
from asyncsgd.runtime.mpi import polled_barrier
from asyncsgd.store import open_store

__all__ = ["run"]


def run(comm, net, src, opts, stop, backend, reporter, *, plan=None, model_name="model", checkpointer=None,
        resume=None):
    """Run Downpour (DownpourOptions ``opts``) on every rank of ``comm`` until ``stop``; return the summary dict on
    rank 0 (None elsewhere).

    ``plan`` is the run's RunPlan (asyncsgd.plan; made here from the arguments when None): servers and workers,
    fault tolerance, the store transport, the options with the model's defaults, the warm start and the overlap.
    ``net`` is this rank's network, built from the same seed on every rank: a worker's replica, rank 0's evaluator,
    and on every server the source of the initial parameters.  ``resume`` is a loaded checkpoint to continue from
    (every rank gets it), or None.
    """
    if plan is None:
        from asyncsgd.plan import plan_for
        plan = plan_for("downpour", comm, src, opts, stop, model_name=model_name, n_params=net.n_params,
                        resumed=resume is not None)
    opts, stop_opts = plan.options, plan.stop
    n_servers, n_workers = plan.servers, plan.workers
    rank = comm.rank
    init = net
    initial = (backend.to_host(net.params) if rank < n_servers else None) if resume is None else resume.params
    done = [0] * n_workers
    if resume is not None:
        saved = resume.data_position.get("worker_samples", [])
        # the same workers continue where they were; another worker count shares the samples done evenly
        done = saved if len(saved) == n_workers else [sum(saved) // n_workers] * n_workers
    checkpointer = checkpointer or Checkpointer(None, init.n_params, {"seed": opts.seed})
    split = TrainingSplit(src, opts.validation, opts.seed)  # the same on every rank; workers read only training rows
    # epochs count the training rows over all workers; steps are per worker (as StopRule counts them)
    schedule, budget = schedule_budget(opts, stop_opts, n_train=split.n_train, workers=n_workers)
    fault_tolerant = plan.fault_tolerant
    # each rank's host, index = rank, for the summary (are the servers on different nodes?): gathered once here,
    # while every rank is sure to be alive, never on a path that handles a failure
    hosts = comm.gather(socket.gethostname(), root=0)
    store = open_store(comm, init.n_params, transport=plan.store, n_servers=n_servers, initial=initial,
                       adagrad=opts.optimizer == "adagrad", fault_tolerant=fault_tolerant)
    board = JobBoard(comm, n_workers, lockless=fault_tolerant)
    # Recovery holds the store and the board (a failure replaces them) and frees them like the ``with`` blocks did:
    # collectively on success, abandoned on an exception (WindowOwner).  Fault tolerance off: no-op safe points.
    guard = Recovery(comm, enabled=fault_tolerant, store=store, board=board, n_servers=n_servers, start=0.0,
                     reporter=reporter, checkpoint_path=checkpointer.path, kill_ranks=opts.kill_ranks)
    try:
        if rank == 0 and resume is not None and "adagrad_sums" in resume.state:
            store.load(resume.params, resume.state["adagrad_sums"])  # before any worker starts pushing
        polled_barrier(comm)
        start = guard.start = time.monotonic()
        guard.arm_kill(opts.kill_ranks.get(rank))
        ft_guard = guard if fault_tolerant else None
        result = None
        if rank >= n_servers:
            worker_loop(plan, net, split, backend, store, board, rank - n_servers, n_workers, start,
                         samples_done=int(done[rank - n_servers]), budget=budget, samples_before=int(sum(done)),
                         guard=ft_guard)
        elif rank == 0:
            record, stats, hist, evaluate = monitor_loop(opts, stop_opts, net, split, backend, store, board,
                                                         n_workers, reporter, start, checkpointer, budget=budget,
                                                          samples_before=int(sum(done)), guard=ft_guard)
            store = guard.store
            if checkpointer.path:
                checkpoint(opts, store, checkpointer, stats)  # the final one
            wall = time.monotonic() - start
            params = record.pop("last_params")  # the final evaluation's snapshot: every worker had returned
            total_hist = hist.sum(axis=0)
            result = evaluate.finish({
                "mode": "downpour", "model": model_name, "data": src.name, "workers": n_workers,
                "servers": n_servers, "test_accuracy": record["test_accuracy"], "test_loss": record["test_loss"],
                "final_loss": record["loss"], "samples": record["samples"],
                "samples_per_s": (record["samples"] - sum(done)) / wall, "wall_s": wall,
                "epochs": record["samples"] / split.n_train, "steps": int(sum(s["steps"] for s in stats)),
                "pushes": record["pushes"], "push_bytes": record["push_bytes"],
                "push_density": record["push_density"],
                "staleness_mean": record["staleness_mean"],
                "staleness_p95": percentile_from_hist(total_hist, 0.95),
                "staleness_hist": total_hist.astype(int).tolist(),
                "skipped_nonfinite": record["skipped_nonfinite"],
                "per_worker_samples_per_s": record["per_worker_samples_per_s"],
                "per_worker_compute_samples_per_s": [(s["samples"] - s["resumed_samples"]) / max(s["compute_s"], 1e-9)
                                                     for s in stats],
                "time_to_target": record["time_to_target"], "n_params": int(init.n_params),
                "checkpoints": checkpointer.written, "resumed_samples": int(sum(done)),
                "layout": init.param_layout(), "stop_reason": record["stop_reason"],
                "lr_schedule": str(schedule), "final_lr": record["lr"],
                **options_as_trained(opts),
                "overlap": plan.overlap,
                "per_worker_overlapped_calls": [int(s["overlapped_calls"]) for s in stats],
                "sparse_block": int(opts.sparse_block),
                # the warm start as it happened: worker 0 alone for these steps, then each worker's first fetch
                "warm_start_steps": int(plan.warm_start_steps),
                "first_fetch_versions": [int(s["first_version"]) for s in stats],
                "hosts": hosts,
            }, params)
            if opts.optimizer == "adagrad":
                result["adagrad_sums"] = store.adagrad_sums()
            result.update(guard.summary())
        fault_point("end")
        # Servers other than rank 0 only host shards: they wait here, sleeping, with their progress thread running
        # (and, with fault tolerance, their heartbeat; a failure here is recovered and the meeting rerun).
        guard.final_meet()
    except BaseException as exc:
        guard.free(type(exc))
        raise
    guard.free()
    return result
