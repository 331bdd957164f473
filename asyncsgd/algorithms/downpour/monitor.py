"""Rank 0 in a Downpour run: score a snapshot of the store every ``eval_every`` seconds (validation and test),
report it, write checkpoints, raise the job board's stop flag on a target, patience or a stop request (``--stop-file``
or a SIGTERM: asyncsgd.runtime.stop_request), and make the evaluation records the summary is built from.  Rank 0
reads the workers only through the board's rows (one-sided), so it never slows them."""
from __future__ import annotations

import sys
import time

import numpy
from mpi4py import MPI

from asyncsgd.algorithms.common import Evaluations, StopRule
from asyncsgd.algorithms.downpour.worker import global_fraction
from asyncsgd.rma.board import FLAG_STOP
from asyncsgd.runtime.stop_request import PREEMPTED, StopRequest, activated

__all__ = ["monitor_loop", "checkpoint", "evaluation_record", "percentile_from_hist"]


def monitor_loop(opts, stop_opts, eval_net, split, backend, store, board, n_workers, reporter, start, checkpointer,
                  budget=None, samples_before=0, guard=None):
    """Rank 0: evaluate every eval_every seconds, report, checkpoint, raise the stop flag; return the final record
    and the Evaluations (its tracker holds the best model).

    With ``stop_opts.stop_file`` a stop request (the file appears, or a SIGTERM reaches this rank: the watchdog
    hands it to the active request) raises the stop flag; the workers end their step and report done, and the
    record's ``stop_reason`` is 'preempted' (the caller then writes the final checkpoint)."""
    stop_file = getattr(stop_opts, "stop_file", None)
    with activated(StopRequest(stop_file) if stop_file else None) as request:
        result = _monitor(opts, stop_opts, eval_net, split, backend, store, board, reporter, start, checkpointer,
                          budget, samples_before, guard, request)
    if result[0]["stop_reason"] == PREEMPTED:
        request.clear()  # honoured: a resumed run with the same --stop-file trains on
    return result


def _monitor(opts, stop_opts, eval_net, split, backend, store, board, reporter, start, checkpointer, budget,
             samples_before, guard, request):
    evaluate = Evaluations(eval_net, split, backend, patience=stop_opts.patience,
                           selection_margin=opts.selection_margin)
    stop = StopRule(stop_opts, samples_per_epoch=split.n_train, start=start)
    schedule = opts.lr_schedule.with_lr(opts.lr)
    last_eval = time.monotonic()
    last_samples, last_time = 0, 0.0
    record = {}
    time_to_target = None
    while True:
        try:
            if guard is not None and guard.check():  # a safe point (fault tolerance): a rank died, state rebuilt
                store, board = guard.store, guard.board
            stats, hist = board.rows() if guard is None else guard.rows()
            all_done = all(s["done"] for s in stats)
            if request is not None and stop.reason is None and not all_done and request.requested():
                stop.reason = PREEMPTED  # the workers end their step; the caller writes the checkpoint
                board.set_flag(FLAG_STOP)
                into = f" {checkpointer.path}" if checkpointer.path else ""
                sys.stderr.write(f"asyncsgd: stop requested ({request.describe()}): every worker ends its step, "
                                 f"then rank 0 writes the checkpoint{into}\n")
                sys.stderr.flush()
            if all_done or time.monotonic() - last_eval >= opts.eval_every:
                # the rate workers apply now: what a worker fetching the current version computes
                lr = schedule.rate(global_fraction(opts, budget, store.version(), start, samples_before))
                snapshot = store.read_all()  # one snapshot: scored on both sets and, if best, kept
                elapsed = stop.elapsed()
                figures = evaluate(snapshot, time=elapsed, samples=int(sum(s["samples"] for s in stats)))
                last_eval = time.monotonic()
                record = evaluation_record(stats, hist, elapsed, figures["test_loss"], figures["test_accuracy"],
                                           last_samples, last_time, eval_net.n_params)
                record.update(figures, lr=lr)
                last_samples, last_time = record["samples"], record["time"]
                record["fraction_done"] = stop.fraction(record["samples"],
                                                        min((s["steps"] for s in stats), default=0))
                if reporter is not None:
                    reporter.record(record)
                acc = evaluate.deciding_accuracy
                if stop.target is not None and acc >= stop.target and time_to_target is None:
                    time_to_target = record["time"]
                    stop.reason = stop.reason or "target-accuracy"
                    board.set_flag(FLAG_STOP)
                if evaluate.should_stop and not all_done and stop.reason is None:
                    stop.stop_early()
                    board.set_flag(FLAG_STOP)
                if all_done:
                    record["last_params"] = snapshot
                    break
            if checkpointer.due():
                checkpoint(opts, store, checkpointer, stats)
            time.sleep(0.05)
        except MPI.Exception as exc:
            # a read of the store met a dead rank (a server on another host: the served store or osc/rdma report
            # it), before anything was written: recover as at the safe point above, then go on
            if guard is None or not guard.is_failure(exc):
                raise
            guard.recover()
            store, board = guard.store, guard.board
    record["time_to_target"] = time_to_target
    # without a target or early stop, the workers ended on their own limits
    record["stop_reason"] = stop.reason or ("epochs" if stop_opts.epochs is not None else
                                            "steps" if stop_opts.steps is not None else "time-limit")
    return record, stats, hist, evaluate


def checkpoint(opts, store, checkpointer, stats):
    """Save the store's state (read one-sidedly while workers keep pushing) and each worker's position."""
    state = {"adagrad_sums": store.adagrad_sums()} if opts.optimizer == "adagrad" else {}
    checkpointer.save(params=store.read_all(), state=state, version=store.version(),
                      data_position={"worker_samples": [int(s["samples"]) for s in stats]})


def evaluation_record(stats, hist, elapsed, test_loss, acc, last_samples, last_time, n_params):
    samples = int(sum(s["samples"] for s in stats))
    pushes = int(sum(s["pushes"] for s in stats))
    total_hist = hist.sum(axis=0)
    entries = sum(s["pushed_entries"] for s in stats)
    # the loss of the replicas training now: a dead or promoted worker's row (retired) keeps its last loss for ever
    losses = [s["loss"] for s in stats if numpy.isfinite(s["loss"]) and not s.get("retired")]
    dt = max(elapsed - last_time, 1e-9)
    return {
        "time": elapsed, "samples": samples, "loss": float(numpy.mean(losses)) if losses else None,
        "test_loss": test_loss, "test_accuracy": acc,
        "samples_per_s": (samples - last_samples) / dt,
        "per_worker_samples_per_s": [(s["samples"] - s["resumed_samples"]) / max(s["elapsed_s"], 1e-9)
                                     for s in stats],
        "pushes": pushes, "staleness_mean": float(sum(s["staleness_sum"] for s in stats) / max(pushes, 1)),
        "staleness_hist": total_hist.astype(int).tolist()[:16],
        "push_bytes": int(sum(s["push_bytes"] for s in stats)),
        "push_density": float(entries) / max(pushes * n_params, 1),  # fraction of the parameters per push
        "skipped_nonfinite": int(sum(s["skipped_nonfinite"] for s in stats)),
    }


def percentile_from_hist(hist, q):
    cum = numpy.cumsum(hist)
    if cum[-1] == 0:
        return 0
    return int(numpy.searchsorted(cum, q * cum[-1]))
