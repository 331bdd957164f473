"""The training API: the four modes as functions over a model, a data source, options and stop rules.

    import asyncsgd
    result = asyncsgd.train_downpour("speech_cnn", "fsdd", asyncsgd.DownpourOptions(n_push=4),
                                     asyncsgd.Stop(epochs=30))
    if result is not None:           # rank 0
        print(result.summary["test_accuracy"]); result.save_model("model.h5")

Run it under ``mpiexec -n 6 python script.py``.  Every rank calls the same function with the same arguments.

Two phases.  ``prepare`` checks everything (options against the data and the job size, the data file, each rank's
device, the network, the checkpoint to resume), resolves every run-level fact once into a frozen ``RunPlan``
(asyncsgd.plan: workers, servers, fault tolerance, store transport, filled defaults, warm start, overlap) and raises
the same ValueError on every rank before any rank starts work, so a bad option never leaves half a job running.
``PreparedRun.execute`` then trains; an exception on any rank there prints that rank's traceback and aborts the whole
job (``comm.Abort(1)``), because the other ranks would otherwise wait for it for ever.  ``python -m asyncsgd.train`` (the command line) uses the same two phases.
(The generic function is ``train_mode``: ``asyncsgd.train`` is the command line's module.)
"""
from __future__ import annotations

import dataclasses
import functools

import numpy

from asyncsgd.model import resolve_model
from asyncsgd.runtime.mpi import abort_on_error
from asyncsgd.options import DownpourOptions, SandblasterOptions, SGDOptions, Stop
from asyncsgd.plan import MODES, RunPlan, check_inputs, network_dtype, plan_job, plan_run

__all__ = ["train_mode", "train_serial", "train_sync", "train_downpour", "train_sandblaster", "prepare",
           "PreparedRun", "TrainResult", "build_network", "resolve_model", "default_comm", "MODES"]


@functools.lru_cache(maxsize=1)
def default_comm():
    """Return the library's communicator: a Dup of COMM_WORLD made once, so its traffic never mixes with yours."""
    from mpi4py import MPI
    return MPI.COMM_WORLD.Dup()


# ---- models ------------------------------------------------------------------------------------------------------
def build_network(model, input_shape, n_classes: int, backend, seed: int = 0, dtype=numpy.float32):
    """Build the network of ``model`` (a registered name, ``'PACKAGE.MODULE:FUNCTION'`` or a factory) on this
    rank's compute object ``backend`` (asyncsgd.backends.select_ops).

    Every network of a run is built here, once per rank, from the same seed (so every rank starts from the same
    parameters).  ``dtype`` float32, or float64 (Sandblaster's convex logreg).  Raises ValueError when the model is
    unknown or does not fit the data (asyncsgd.model.build_model says why).
    """
    from asyncsgd.model import build_model
    return build_model(model, tuple(int(d) for d in input_shape), int(n_classes), seed=seed, xp=backend.xp,
                       dtype=dtype, ops=backend)


# ---- results -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainResult:
    """What a run returns on rank 0: the summary (test accuracy, throughput, stop reason, ...) and the parameters of
    the selected model (a float vector laid out as ``layout``: [(name, offset, shape)]).

    With a validation split the selected model is the one with the best validation accuracy (``summary
    ["selected_model"]`` is "best", or "last" when the final evaluation was the best); ``extras["last_params"]``
    then holds the last model's parameters when they differ.  ``summary["test_accuracy"]`` is the selected model's.
    """
    summary: dict
    params: numpy.ndarray
    layout: list
    model: str
    input_shape: tuple
    n_classes: int
    extras: dict = dataclasses.field(default_factory=dict)  # e.g. Downpour's Adagrad sums
    spec: list | None = None   # the network's layer specs (Network.spec()): a saved model rebuilds without user code
    name: str | None = None    # the network's own name

    @property
    def test_accuracy(self):
        return self.summary.get("test_accuracy")

    def save_model(self, path, config: dict | None = None) -> None:
        """Write the trained model to ``path`` (HDF5; asyncsgd.model.files format)."""
        from asyncsgd.model.files import save_model
        save_model(path, numpy.asarray(self.params), self.layout,
                   {"model": self.model, "input_shape": list(self.input_shape), "n_classes": int(self.n_classes),
                    "config": dict(config if config is not None else self.summary.get("config", {})),
                    "test_accuracy": self.summary.get("test_accuracy"), "spec": self.spec,
                    "name": self.name})


# ---- the two phases ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PreparedRun:
    """A run whose every input has been checked on every rank; ``execute()`` trains it.

    ``options`` and ``stop`` are as given; ``plan`` holds what prepare resolved from them (asyncsgd.plan.RunPlan)."""
    mode: str
    comm: object
    net: object
    src: object
    options: object
    stop: Stop
    backend: object
    model_name: str
    checkpointer: object
    resume: object
    plan: RunPlan | None = None

    @property
    def config(self) -> dict:
        """The run's options as one plain dict (mode, model, data, every option), as logs and files record it."""
        return dict(self.plan.config)

    def execute(self, reporter=None, *, config: dict | None = None):
        """Train; return a TrainResult on rank 0 (None elsewhere).  An exception on any rank aborts the job.

        ``config`` is the summary's record of the run (default: ``self.config``; the command line records its
        flags and output files)."""
        from asyncsgd.algorithms import get_mode
        run = get_mode(self.mode).run

        def work():
            return run(self.comm, self.net, self.src, self.options, self.stop, self.backend, reporter,
                       plan=self.plan, model_name=self.model_name, checkpointer=self.checkpointer,
                       resume=self.resume)

        if self.comm is None:
            summary = work()
        else:
            with abort_on_error(self.comm):  # one rank's exception ends the job (docs/FAILURES.md)
                summary = work()
        if summary is None:
            return None
        params = summary.pop("params", None)
        layout = summary.pop("layout", None)
        extras = {k: summary.pop(k) for k in ("adagrad_sums", "last_params") if k in summary}
        summary["config"] = dict(config) if config is not None else self.config
        return TrainResult(summary, params, layout, self.model_name, tuple(self.src.input_shape),
                           int(self.src.n_classes), extras, spec=self.net.spec(), name=self.net.name)


def _open(data):
    from asyncsgd.data import DataSource, open_source
    return data if isinstance(data, DataSource) else open_source(data)


def prepare(mode, model, data, options=None, stop=None, *, comm=None, device="cpu", checkpoint=None,
            root_check=None):
    """Check every input of a run on every rank and return a PreparedRun; raise the same ValueError on every rank
    (UsageError for what rank 0 alone checked) before any rank starts work.

    ``mode`` one of MODES; ``model`` a name, 'PACKAGE.MODULE:FUNCTION' or a factory; ``data`` an open DataSource or
    a spec (a path to .h5, 'fsdd', 'synthetic:N'); ``options`` SGDOptions (serial, sync), DownpourOptions or
    SandblasterOptions (None: defaults); ``stop`` a Stop; ``comm`` None for ``default_comm()`` (serial: no MPI);
    ``device`` cpu, gpu or auto; ``checkpoint`` CheckpointOptions or None; ``root_check`` a callable rank 0 runs
    first (the command line checks its output folders there).
    """
    from asyncsgd.backends import BackendError, select_ops
    from asyncsgd.runtime.mpi import UsageError, check_on_root, local_rank
    from asyncsgd.algorithms.resume import Checkpointer, load_resume
    from asyncsgd.backends.cpu_kernels import switch

    options, stop = check_inputs(mode, options, stop, checkpoint)
    if mode == "serial":
        comm, size, rank = None, 1, 0
    else:
        comm = default_comm() if comm is None else comm
        size, rank = comm.size, comm.rank
    job = plan_job(mode, options, stop, checkpoint, size)  # rank counts, store transport, fault tolerance
    switch()  # ASYNCSGD_CPU_KERNELS: a typo is a usage error here, not a silent choice inside every rank's ops

    def on_root(check):
        return check() if comm is None else check_on_root(comm, check, root=0)

    def everywhere(make):
        """Run ``make()`` on every rank; if it failed anywhere, raise the first failure on every rank."""
        try:
            value, error = make(), None
        except (BackendError, ValueError, TypeError, OSError, ImportError) as exc:
            value, error = None, str(exc)
        errors = [error] if comm is None else comm.allgather(error)
        first = next(((r, e) for r, e in enumerate(errors) if e is not None), None)
        if first is not None:
            raise UsageError(first[1] if first[0] == 0 else f"rank {first[0]}: {first[1]}")
        return value

    # an import path may resolve on one node and not on another (another working directory): agree first
    model_name = everywhere(lambda: resolve_model(model)[0])
    src = on_root(lambda: (root_check() if root_check else None, _open(data))[1])
    # cheap after rank 0 validated the file; every rank reads its own slice (a node may still lack the file)
    src = everywhere(lambda: src if rank == 0 else _open(data))
    node_rank = 0 if comm is None else local_rank(comm)  # picks this rank's GPU among the node's
    backend = everywhere(lambda: select_ops(device, node_rank))
    dtype = network_dtype(mode, model_name)
    net = everywhere(lambda: build_network(model, src.input_shape, src.n_classes, backend, options.seed, dtype))
    resume = on_root(lambda: load_resume(checkpoint, mode, model_name, net.n_params))
    if rank != 0 and checkpoint is not None and checkpoint.resume is not None:
        resume = load_resume(checkpoint, mode, model_name, net.n_params)  # known good: rank 0 read it
    # the data's rules, the filled defaults, the warm start and the overlap (the same on every rank)
    plan = plan_run(job, options, stop, src=src, model_name=model_name, n_params=net.n_params,
                    resumed=resume is not None)
    checkpointer = None
    if mode != "sandblaster":
        checkpointer = Checkpointer(checkpoint, net.n_params, {"seed": options.seed}, model_name=model_name,
                                    config=dict(plan.config))
    return PreparedRun(mode, comm, net, src, options, stop, backend, model_name, checkpointer, resume, plan)


def train_mode(mode, model, data, options=None, stop=None, *, comm=None, device="cpu", checkpoint=None, log=None,
               progress="auto"):
    """Train ``model`` on ``data`` in ``mode``; return a TrainResult on rank 0 and None on the other ranks.

    Arguments as in ``prepare``; ``log`` a JSONL file of one record per evaluation (rank 0 writes it),
    ``progress`` auto, bar, lines or none (rank 0's display).  Invalid input raises ValueError/TypeError on every
    rank before any work; an exception while training aborts the whole job.
    """
    from asyncsgd.io.metrics import Reporter
    run = prepare(mode, model, data, options, stop, comm=comm, device=device, checkpoint=checkpoint)
    reporter = None
    if run.comm is None or run.comm.rank == 0:
        reporter = Reporter(log, progress=progress, append=run.resume is not None)
    watchdog = None
    if run.comm is not None:
        from asyncsgd.runtime.watchdog import Watchdog
        watchdog = Watchdog(run.comm, fault_tolerant=run.plan.fault_tolerant, stop_file=run.plan.stop.stop_file)
    try:
        result = run.execute(reporter)
    finally:
        if reporter is not None:
            reporter.close()
    if watchdog is not None:
        watchdog.stop()
    return result


def train_serial(model, data, options: SGDOptions | None = None, stop: Stop | None = None, **kwargs):
    """Mini-batch SGD with momentum in this one process (no MPI).  See ``train_mode``."""
    return train_mode("serial", model, data, options, stop, **kwargs)


def train_sync(model, data, options: SGDOptions | None = None, stop: Stop | None = None, **kwargs):
    """Synchronous data-parallel SGD: every rank a replica, one Allreduce per step.  See ``train_mode``."""
    return train_mode("sync", model, data, options, stop, **kwargs)


def train_downpour(model, data, options: DownpourOptions | None = None, stop: Stop | None = None, **kwargs):
    """Downpour SGD: ``options.servers`` ranks host the parameter shards, the others train asynchronously.
    See ``train_mode``."""
    return train_mode("downpour", model, data, options, stop, **kwargs)


def train_sandblaster(model, data, options: SandblasterOptions | None = None, stop: Stop | None = None, **kwargs):
    """Sandblaster L-BFGS: sharded L-BFGS with dynamically scheduled mini-shards on every rank.  See ``train_mode``."""
    return train_mode("sandblaster", model, data, options, stop, **kwargs)
