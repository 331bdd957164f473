"""Entry point: ``python -m asyncsgd.train`` (Downpour under mpiexec by default; see ``--help``).

Order of work: parse the flags and map them to the option dataclasses, which check every value (every rank
identically); prepare the run (asyncsgd.api.prepare: the plan's rules, the data and device on rank 0 with the verdict
shared), and only then start training.  Any bad input ends the job with one ``asyncsgd: error:`` line from
rank 0 and exit status 2, before anything is written.
"""
from __future__ import annotations

import os
import sys
import time

from asyncsgd.io.atomic import output_folder_problem
from asyncsgd.cli import (OUTPUT_OPTIONS, config_to_dict, parse_config, parse_slow_ranks, to_options, to_toml,
                          usage_error)
from asyncsgd.runtime.mpi import EXIT_USAGE, UsageError

__all__ = ["main"]

from asyncsgd.runtime.env import RANK_VARIABLES as _RANK_VARIABLES, SIZE_VARIABLES as _SIZE_VARIABLES
from asyncsgd.runtime.env import launcher_value as _launcher_value, limit_blas_threads as _limit_blas_threads


def _fail(message: str, rank: int) -> int:
    if rank == 0:
        sys.stderr.write(f"asyncsgd: error: {message}\n")
        sys.stderr.flush()
    return EXIT_USAGE


def _fail_job(message: str, comm=None) -> int:
    """Print a usage error once, from rank 0, and return its exit status: every rank of the job calls this.

    Every rank gets here with the same verdict (the same command line; prepare shares each check's outcome), so the
    barrier is safe: the other ranks wait for rank 0's line, because Open MPI's launcher ends the job, dropping
    output not yet forwarded, as soon as any rank exits non-zero.  Bounded, in case a rank is elsewhere after all.
    Outside mpiexec (one process) it only prints.
    """
    if comm is None:
        if _launcher_value(_SIZE_VARIABLES, 1) <= 1:
            return _fail(message, 0)
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
    from asyncsgd.runtime.mpi import polled_barrier
    code = _fail(message, comm.rank)
    try:
        polled_barrier(comm, timeout=10)
    except TimeoutError:
        pass
    return code


def _prepare_outputs(cfg):
    """Rank 0: choose the run folder and check that every output path can be written, before training starts.

    By default the outputs go to a new ``runs/YYYYmmdd-HHMMSS/`` (never an existing folder); ``--run-dir DIR``
    names it (it must not exist or be empty), ``--run-dir none`` writes only the files named explicitly.  Explicit
    ``--log``, ``--summary-json`` and ``--model-out`` win over the folder's defaults; with all three given and no
    ``--run-dir``, no folder is made.
    """
    if cfg.run_dir not in (None, "none") and os.path.exists(cfg.run_dir) and (
            not os.path.isdir(cfg.run_dir) or os.listdir(cfg.run_dir)):
        raise UsageError(f"--run-dir: {cfg.run_dir} already exists and is not empty; choose a new folder "
                         f"(runs are never overwritten)")
    for opt in ("log", "summary_json", "model_out", "checkpoint"):
        path = getattr(cfg, opt)
        if path is None:
            continue
        problem = output_folder_problem(path)
        if problem is not None:
            raise UsageError(f"--{opt.replace('_', '-')}: {problem}")


def _make_run_dir(cfg):
    """Rank 0, once every input is known good: create the run folder, point the unset outputs into it and write
    the resolved options there (as a file --config accepts; outputs left out, so a rerun gets a folder of its own)."""
    if cfg.run_dir is None and all(getattr(cfg, opt) is not None for opt in ("log", "summary_json", "model_out")):
        cfg.run_dir = "none"  # every output has a place already (job scripts): no folder of config.toml alone
    if cfg.run_dir == "none":
        return
    cfg.run_dir = _new_run_dir(cfg.run_dir)
    for opt, name in (("log", "metrics.jsonl"), ("summary_json", "summary.json"), ("model_out", "model.h5")):
        if getattr(cfg, opt) is None:
            setattr(cfg, opt, os.path.join(cfg.run_dir, name))
    with open(os.path.join(cfg.run_dir, "config.toml"), "w", encoding="utf-8") as f:
        f.write(to_toml(cfg, skip=OUTPUT_OPTIONS))


def _new_run_dir(requested):
    """Create and return the run folder: ``requested``, or runs/<date-time> (with -2, -3... if taken)."""
    if requested is not None:
        if os.path.exists(requested) and (not os.path.isdir(requested) or os.listdir(requested)):
            raise UsageError(f"--run-dir: {requested} already exists and is not empty; choose a new folder "
                             f"(runs are never overwritten)")
        try:
            os.makedirs(requested, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--run-dir: cannot create {requested}: {exc.strerror}") from None
        return requested
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        os.makedirs("runs", exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--run-dir: cannot create runs/ here ({exc.strerror}); give --run-dir DIR "
                         f"or --run-dir none") from None
    for n in range(1, 1000):
        path = os.path.join("runs", stamp if n == 1 else f"{stamp}-{n}")
        try:
            os.mkdir(path)  # atomic: two runs started in the same second get different folders
            return path
        except FileExistsError:
            continue
    raise UsageError("--run-dir: runs/ holds 999 folders of this second; give --run-dir DIR")


def _check_model_fits(cfg, src):
    """The built-in CNNs' input contracts, in the command line's words (every rank, deterministic)."""
    if cfg.model == "mnist_cnn" and tuple(src.input_shape) != (1, 28, 28):
        raise UsageError(f"--model mnist_cnn needs 1x28x28 inputs but {cfg.data} holds "
                         f"{'x'.join(map(str, src.input_shape))}; use --model speech_cnn or logreg")


def _write_outputs(cfg, result, reporter):
    """Rank 0: final model, summary JSON, and the final accuracy line that job scripts look for."""
    from asyncsgd.io.metrics import write_json_atomic

    summary = result.summary  # its config is the command line's record (PreparedRun.execute(config=...))
    if cfg.model_out and result.params is not None:
        result.save_model(cfg.model_out, summary["config"])  # the selected model
        if result.extras.get("last_params") is not None:
            # the best model was selected: the last one goes beside it, so both are at hand
            import dataclasses
            stem, ext = os.path.splitext(cfg.model_out)
            summary["last_model_out"] = f"{stem}-last{ext or '.h5'}"
            last = dataclasses.replace(result, params=result.extras["last_params"],
                                       summary={**summary, "test_accuracy": summary.get("last_test_accuracy")})
            last.save_model(summary["last_model_out"], summary["config"])
        summary["model_out"] = cfg.model_out
    if cfg.summary_json:
        write_json_atomic(cfg.summary_json, summary)
    reporter.close()  # ends a live progress line; the result lines below print whatever --progress says
    acc = summary.get("test_accuracy")
    chosen = ""
    if summary.get("selected_validation_accuracy") is not None:
        chosen = (f" (selected model: {summary['selected_model']}, validation "
                  f"{summary['selected_validation_accuracy']:.4f})")
    print(f"final test accuracy: {acc:.4f}{chosen}" if acc is not None else "final test accuracy: n/a")
    for lost in summary.get("lost_workers", []):  # fault tolerance (docs/FAULT_TOLERANCE.md)
        print(f"lost worker {lost['worker']} (rank {lost['rank']}) at {lost['time']:.1f} s", flush=True)
    print(f"mode {summary['mode']}, {summary.get('workers', 1)} worker(s), "
          f"{summary.get('samples_per_s', 0):.0f} samples/s, wall {summary.get('wall_s', 0):.1f} s", flush=True)
    if cfg.run_dir != "none":
        print(f"outputs in {cfg.run_dir}", flush=True)


def _prepare(cfg, opts, comm):
    """Check every input of the mapped options ``opts`` = (options, stop, checkpoint) (all ranks); return the
    PreparedRun or raise UsageError."""
    from asyncsgd.api import prepare
    from asyncsgd.options import OptionError
    options, stop, checkpoint = opts
    try:
        run = prepare(cfg.mode, cfg.model, cfg.data, options, stop, comm=comm, device=cfg.device,
                      checkpoint=checkpoint, root_check=lambda: _prepare_outputs(cfg))
    except OptionError as exc:
        raise usage_error(exc) from None
    except (ValueError, TypeError) as exc:  # raised alike on every rank: rank 0 prints it
        raise UsageError(str(exc)) from None
    _check_model_fits(cfg, run.src)
    if comm is None:
        _make_run_dir(cfg)
    else:
        from asyncsgd.runtime.mpi import check_on_root
        check_on_root(comm, lambda: _make_run_dir(cfg), root=0)
    return run


def _run_serial(cfg, opts) -> int:
    from asyncsgd.runtime.mpi import abort_on_error
    from asyncsgd.io.metrics import Reporter
    try:
        run = _prepare(cfg, opts, None)
    except UsageError as exc:
        return _fail(str(exc), 0)
    reporter = Reporter(cfg.log, progress=cfg.progress, append=run.resume is not None)
    # an exception prints "[asyncsgd rank 0] ..." and its traceback once, and exits with status 1
    with abort_on_error(None):
        try:
            result = run.execute(reporter, config=config_to_dict(cfg))
            _write_outputs(cfg, result, reporter)
        finally:
            reporter.close()
    return 0


def _run_distributed(cfg, opts) -> int:
    from mpi4py import MPI
    from asyncsgd.runtime.mpi import abort_on_error, install_abort_hook
    from asyncsgd.io.metrics import Reporter

    world = MPI.COMM_WORLD
    comm = world.Dup()
    install_abort_hook(comm)
    rank = comm.rank
    try:
        if cfg.mode != "sandblaster":  # --slow-ranks names ranks of the job in any mode (Sandblaster's plan checks it)
            from asyncsgd.options import OptionError
            from asyncsgd.plan import ranks_in_job
            try:
                ranks_in_job("slow_ranks", parse_slow_ranks(cfg.slow_ranks), comm.size)
            except OptionError as exc:
                raise usage_error(exc) from None
        run = _prepare(cfg, opts, comm)
    except UsageError as exc:
        code = _fail_job(str(exc), comm)
        comm.Free()
        return code
    from asyncsgd.runtime.watchdog import Watchdog
    # An exception on this rank, anywhere below, prints its rank-tagged traceback once and aborts every rank at
    # once (docs/FAILURES.md); on the way out nothing collective runs (the Watchdog is a WindowOwner), only the
    # reporter's file is closed.
    with abort_on_error(comm), Watchdog(comm, fault_tolerant=run.plan.fault_tolerant, stop_file=run.plan.stop.stop_file):
        reporter = Reporter(cfg.log, progress=cfg.progress, append=run.resume is not None) if rank == 0 else None
        try:
            result = run.execute(reporter, config=config_to_dict(cfg))
            if rank == 0:
                _write_outputs(cfg, result, reporter)
        finally:
            if reporter is not None:
                reporter.close()  # local: the log keeps every record written before a failure
    from asyncsgd.ulfm.primitives import end_after_failures
    end_after_failures()  # after running through a dead rank: exit 0 now, no MPI_Finalize (docs/FAULT_TOLERANCE.md)
    comm.Free()
    return 0


def main(argv=None) -> int:
    """Run the trainer; return the process exit status."""
    _limit_blas_threads()
    rank_hint = _launcher_value(_RANK_VARIABLES, 0)
    try:
        cfg = parse_config(argv)
        opts = to_options(cfg)  # every value checked by its option class, before --print-config as before any run
    except UsageError as exc:
        return _fail_job(str(exc))
    if cfg.print_config:
        if rank_hint == 0:
            sys.stdout.write(to_toml(cfg))
        return 0
    if cfg.mode == "serial":
        from asyncsgd.plan import check_job_size
        try:
            check_job_size("serial", _launcher_value(_SIZE_VARIABLES, 1))  # before MPI: serial never starts it
        except ValueError as exc:
            return _fail_job(str(exc))
        return _run_serial(cfg, opts)
    return _run_distributed(cfg, opts)


if __name__ == "__main__":
    sys.exit(main())
