"""Entry point: ``python -m asyncsgd.train`` (Downpour under mpiexec by default; see ``--help``).

Order of work: parse and validate every option (every rank identically), check the data and device on rank 0 and
share the verdict, and only then start training.  Any bad input ends the job with one ``asyncsgd: error:`` line from
rank 0 and exit status 2, before anything is written.
"""
from __future__ import annotations

import os
import sys

from .config import config_to_dict, parse_config, to_toml, validate
from .mpiutil import EXIT_USAGE, UsageError

__all__ = ["main"]

_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")
_LOCAL_SIZE_VARIABLES = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE")
_BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")


def _launcher_value(names, default):
    """Read this process's rank or size from the launcher's environment, before MPI is initialised."""
    for name in names:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return default


def _limit_blas_threads():
    """Give each rank its share of the node's cores for BLAS, unless the user chose (before numpy loads).

    Several ranks per node each starting a BLAS thread per core oversubscribe the node: 6 ranks on 2 cores ran
    8.6x slower with OpenBLAS's default threads than with one each.
    """
    if any(v in os.environ for v in _BLAS_THREAD_VARIABLES):
        return
    local = _launcher_value(_LOCAL_SIZE_VARIABLES, None) or _launcher_value(("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"), 1)
    if local <= 1:
        return
    threads = str(max(1, (os.cpu_count() or 1) // local))
    for name in _BLAS_THREAD_VARIABLES:
        os.environ[name] = threads


def _fail(message: str, rank: int) -> int:
    if rank == 0:
        sys.stderr.write(f"asyncsgd: error: {message}\n")
        sys.stderr.flush()
    return EXIT_USAGE


def _prepare_outputs(cfg):
    """Check that every output path can be written before training starts (nothing is created yet)."""
    for opt in ("log", "summary_json", "model_out", "checkpoint"):
        path = getattr(cfg, opt)
        if path is None:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise UsageError(f"--{opt.replace('_', '-')}: folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise UsageError(f"--{opt.replace('_', '-')}: folder {folder} is not writable")


def _open_data(cfg):
    from .data import open_source
    from .model import check_model
    src = open_source(cfg.data)
    if cfg.model == "mnist_cnn" and tuple(src.input_shape) != (1, 28, 28):
        raise UsageError(f"--model mnist_cnn needs 1x28x28 inputs but {cfg.data} holds "
                         f"{'x'.join(map(str, src.input_shape))}; use --model speech_cnn or logreg")
    try:
        check_model(cfg.model, src.input_shape, src.n_classes)   # the factory says when the data does not fit
    except ValueError as exc:
        raise UsageError(f"--model {cfg.model}: {exc}") from None
    return src


def _write_outputs(cfg, src, summary, reporter):
    """Rank 0: final model, summary JSON, and the final accuracy line that job scripts look for."""
    from .ops.metrics import write_json_atomic
    from .ops.modelio import save_model
    import numpy

    params = summary.pop("params", None)
    layout = summary.pop("layout", None)
    summary.pop("adagrad_sums", None)
    summary["config"] = config_to_dict(cfg)
    if cfg.model_out and params is not None:
        save_model(cfg.model_out, numpy.asarray(params), layout,
                   {"model": cfg.model, "input_shape": list(src.input_shape), "n_classes": int(src.n_classes),
                    "config": summary["config"], "test_accuracy": summary.get("test_accuracy")})
    if cfg.summary_json:
        write_json_atomic(cfg.summary_json, summary)
    reporter.close()  # ends a live progress line; the result lines below print whatever --progress says
    acc = summary.get("test_accuracy")
    print(f"final test accuracy: {acc:.4f}" if acc is not None else "final test accuracy: n/a")
    print(f"mode {summary['mode']}, {summary.get('workers', 1)} worker(s), "
          f"{summary.get('samples_per_s', 0):.0f} samples/s, wall {summary.get('wall_s', 0):.1f} s", flush=True)


def _n_params(cfg, src) -> int:
    """The number of parameters of the model this run builds."""
    from .model import build_model
    return build_model(cfg.model, src.input_shape, src.n_classes, seed=cfg.seed).n_params


def _load_resume(cfg, n_params: int):
    """Load the checkpoint --resume names (None when there is none), checked against this run's model."""
    from .algorithms.resume import load_resume

    return None if cfg.resume is None else load_resume(cfg, n_params)


def _run_serial(cfg) -> int:
    from .backend import BackendError, select_backend
    from .algorithms import get_mode
    from .mpiutil import abort_on_error
    from .ops.metrics import Reporter
    try:
        _prepare_outputs(cfg)
        src = _open_data(cfg)
        backend = select_backend(cfg.device)
        resume = _load_resume(cfg, _n_params(cfg, src)) if cfg.resume is not None else None
    except (UsageError, ValueError, OSError, BackendError) as exc:
        return _fail(str(exc), 0)
    reporter = Reporter(cfg.log, progress=cfg.progress, append=resume is not None)
    # an exception prints "[asyncsgd rank 0] ..." and its traceback once, and exits with status 1
    with abort_on_error(None):
        try:
            summary = get_mode("serial").run(None, cfg, src, backend, reporter, resume=resume)
            _write_outputs(cfg, src, summary, reporter)
        finally:
            reporter.close()
    return 0


def _run_distributed(cfg) -> int:
    from mpi4py import MPI
    from .backend import BackendError, select_backend
    from .algorithms import get_mode
    from .mpiutil import abort_on_error, check_on_root, install_abort_hook, local_rank
    from .ops.metrics import Reporter

    world = MPI.COMM_WORLD
    comm = world.Dup()
    install_abort_hook(comm)
    rank = comm.rank
    try:
        validate(cfg, comm.size)
        if cfg.mode == "sandblaster" and cfg.servers != 1:
            raise UsageError("--servers applies to --mode downpour only")
        src = check_on_root(comm, lambda: (_prepare_outputs(cfg), _open_data(cfg))[1], root=0)
        if rank != 0:
            src = _open_data(cfg)  # cheap after rank 0 validated the file; every rank reads its own slice
        try:
            backend, error = select_backend(cfg.device, local_rank(comm)), None
        except (BackendError, ValueError) as exc:
            backend, error = None, str(exc)
        errors = comm.allgather(error)
        first = next(((r, e) for r, e in enumerate(errors) if e is not None), None)
        if first is not None:
            raise UsageError(first[1] if first[0] == 0 else f"rank {first[0]}: {first[1]}")
        n_params = _n_params(cfg, src)
        if cfg.mode == "downpour" and cfg.servers > n_params:
            raise UsageError(f"--servers {cfg.servers} is more shards than the model's {n_params} parameters")
        # rank 0 checks the checkpoint (a bad one is one error); the others read it only once it is known good
        resume = check_on_root(comm, lambda: _load_resume(cfg, n_params), root=0)
        if rank != 0:
            resume = _load_resume(cfg, n_params)
    except UsageError as exc:
        code = _fail(str(exc), rank)
        comm.Free()
        return code
    from .watchdog import Watchdog
    # An exception on this rank, anywhere below, prints its rank-tagged traceback once and aborts every rank at
    # once (docs/FAILURES.md); on the way out nothing collective runs (the Watchdog is a WindowOwner), only the
    # reporter's file is closed.
    with abort_on_error(comm), Watchdog(comm):
        reporter = Reporter(cfg.log, progress=cfg.progress, append=resume is not None) if rank == 0 else None
        try:
            extra = {"resume": resume} if resume is not None else {}
            summary = get_mode(cfg.mode).run(comm, cfg, src, backend, reporter, **extra)
            if rank == 0:
                _write_outputs(cfg, src, summary, reporter)
        finally:
            if reporter is not None:
                reporter.close()  # local: the log keeps every record written before a failure
    comm.Free()
    return 0


def main(argv=None) -> int:
    """Run the trainer; return the process exit status."""
    _limit_blas_threads()
    rank_hint = _launcher_value(_RANK_VARIABLES, 0)
    try:
        cfg = parse_config(argv)
    except UsageError as exc:
        return _fail(str(exc), rank_hint)
    if cfg.print_config:
        if rank_hint == 0:
            sys.stdout.write(to_toml(cfg))
        return 0
    if cfg.mode == "serial":
        if _launcher_value(_SIZE_VARIABLES, 1) > 1:
            from mpi4py import MPI  # initialise MPI: Open MPI's launcher drops the output of ranks that never do
            return _fail("--mode serial runs in one process; start it without mpiexec "
                         "(or choose --mode downpour, sync or sandblaster)", MPI.COMM_WORLD.rank)
        return _run_serial(cfg)
    return _run_distributed(cfg)


if __name__ == "__main__":
    sys.exit(main())
