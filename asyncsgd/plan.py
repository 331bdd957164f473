"""A run's plan: every run-level fact resolved once, before any rank starts work, into one frozen object.

``asyncsgd.api.prepare`` builds it in two steps, both on every rank with the same inputs (so the same verdict):

- ``plan_job(mode, options, stop, checkpoint, size)`` before any data is opened: the option types, the rules that
  tie option sets together (patience needs a validation split, checkpoints need a resumable mode), the store
  transport (``ASYNCSGD_STORE``, Downpour), whether the run is fault tolerant, and the rank counts;
- ``plan_run(job, options, stop, ...)`` once the data, the network and the checkpoint to resume are known: the
  rules that need the data (the validation split, Sandblaster's batch), the model's defaults filled in
  (``sgd_defaults``, once, with the job's replica counts), Downpour's warm-start steps and overlap mode, and the
  run's options as one plain dict (the summary's and the checkpoints' ``config``).

The algorithms (``asyncsgd.algorithms``) read the ``RunPlan``; they re-derive none of it.  Value rules of a single
option live in its dataclass (asyncsgd.options); the rules here need a mode, the job size or the data.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from types import MappingProxyType

import numpy

from asyncsgd.options import (CheckpointOptions, DownpourOptions, OptionError, SandblasterOptions, SGDOptions, Stop,
                              options_to_dict)
from asyncsgd.schedule import RunBudget, Warmup

__all__ = ["MODES", "OPTIONS", "RESUMABLE_MODES", "JobShape", "RunPlan", "check_inputs", "check_job_size",
           "ranks_in_job", "plan_job", "plan_run", "plan_for", "network_dtype", "sgd_defaults",
           "ASYNC_HALF_BATCH_ABOVE", "warm_start_steps", "WARM_START_FRACTION", "sandblaster_defaults",
           "check_sandblaster", "MINI_SHARDS_PER_REPLICA"]

# The training modes (the command line's --mode choices, in this order) and the options each takes.
MODES = ("downpour", "sync", "sandblaster", "serial")
OPTIONS = MappingProxyType({"serial": SGDOptions, "sync": SGDOptions, "downpour": DownpourOptions,
                            "sandblaster": SandblasterOptions})
RESUMABLE_MODES = ("serial", "sync", "downpour")  # the modes that write checkpoints and resume from them


# ---- the SGD modes' defaults ---------------------------------------------------------------------------------------
# Defaults that train each model well with momentum 0.9 (the measured runs are in the README, "Benchmarks").
_SGD_DEFAULTS = {
    # model: (lr for sgd, lr for adagrad, batch, epochs)
    "speech_cnn": (0.01, 0.01, 32, 30),
    "mnist_cnn": (0.01, 0.01, 64, 3),
    "logreg": (0.01, 0.05, 64, 20),
}

# Downpour with more replicas than this halves the model's default batch (and rate): see sgd_defaults.
ASYNC_HALF_BATCH_ABOVE = 3


def sgd_defaults(opts, stop, model_name: str, async_replicas: int = 1, sync_replicas: int = 1):
    """Return ``(opts, stop)`` with the options left unset (None) filled with the model's defaults (new objects).

    With ``async_replicas`` W > 2 Downpour replicas the default SGD learning rate is scaled by 2/W: their steps land
    on the store concurrently, each with its own momentum, so the effective step grows with W.  Measured on FSDD
    with 5 workers at a constant rate: lr 0.01 drove the network to a constant output, 0.004 reached 98.7% test
    accuracy in 73 s.  Under a schedule with a warm-up (the default ``warmup:0.05+cosine``) the first pushes run at a
    tenth of the peak, and the peak is scaled by 3/W instead (0.006 for 5 workers): on FSDD, seeds 10-12, the last
    models reached 0.990-0.997 test accuracy against 0.983-0.997 at 0.004.
    With ``sync_replicas`` W all-reduce replicas (``--mode sync``) the default SGD rate is multiplied by sqrt(W):
    a step averages W batches, so a run of the same epochs takes W times fewer steps, each with less gradient noise
    (the square-root rule).  Measured on FSDD with 4 replicas, 30 epochs: at peak 0.01 the last models of seeds 0-4
    and 10 reached 0.980-0.990 test accuracy; at 0.02 (= 0.01 x sqrt(4)) seed 10 reached 0.993, seed 11 0.990-0.993
    over its last evaluations (docs/SCHEDULES.md, section 8).
    With W > 3 Downpour replicas (SGD at the store) the model's batch is also halved when not given, and the
    default rate with it (linear scaling: the same rate per sample): twice the pushes, each of half the samples, so
    a push that lands tau pushes late is half as many samples stale.  Measured on FSDD with 5 workers, 30 epochs,
    seeds 5-9: test errors (of 300) averaged 4.0 at batch 64 (lr 0.012), 2.4 at 32 (0.006), 1.2 at 16 (0.003);
    seeds 0-4 at 16: 2.0 against 2.4 at 32 (docs/SCHEDULES.md, section 11).  A run takes ~10% longer.
    A model that is not built in (a user factory) gets lr 0.01, batch 32 and 10 epochs.

    ``plan_run`` calls it once per run, with the job's replica counts; the filled copies are ``RunPlan.options``
    and ``RunPlan.stop`` (the options given stay as they were).
    """
    lr_sgd, lr_ada, batch, epochs = _SGD_DEFAULTS.get(model_name, (0.01, 0.01, 32, 10))
    fill = {}
    halve = async_replicas > ASYNC_HALF_BATCH_ABOVE and opts.batch_size is None and opts.optimizer != "adagrad"
    if halve:
        batch = max(1, batch // 2)
    if opts.lr is None:
        share = 3.0 if isinstance(opts.lr_schedule, Warmup) else 2.0
        fill["lr"] = lr_ada if opts.optimizer == "adagrad" else (
            lr_sgd * min(1.0, share / max(async_replicas, 1)) * math.sqrt(max(sync_replicas, 1))
            * (0.5 if halve else 1.0))
    if opts.momentum is None:
        fill["momentum"] = 0.0 if opts.optimizer == "adagrad" else 0.9
    if opts.batch_size is None:
        fill["batch_size"] = batch
    if not stop.is_set():
        stop = dataclasses.replace(stop, epochs=epochs)
    return dataclasses.replace(opts, **fill), stop


# DistBelief's warm start by default: one replica alone over the first 9% of the run, then all of them.  Measured on
# FSDD with 5 workers (30 epochs, 200 warm steps, docs/SCHEDULES.md section 10): selected-model test accuracy
# 0.993-1.000 on seeds 10-14 against 0.983-1.000 without; asynchronous steps hurt most from the random start, where
# gradients are large and change fastest, and a replica alone takes them without staleness.
WARM_START_FRACTION = 0.09


def warm_start_steps(opts, stop, *, n_train: int, workers: int, resumed: bool) -> int:
    """Return the steps Downpour's worker 0 takes alone first: ``opts.warm_start_steps``, or when it is None the
    first ``WARM_START_FRACTION`` of the run's samples (epochs or steps; none for a run bounded only in time) in steps
    of ``opts.batch_size`` (filled); 0 with one worker and for a resumed run (it starts from a trained model)."""
    if resumed or workers < 2:
        return 0
    if opts.warm_start_steps is not None:
        return int(opts.warm_start_steps)
    if stop.epochs is None and stop.steps is None:
        return 0
    total = RunBudget.from_limits(n_train=n_train, batch_size=opts.batch_size, workers=workers, epochs=stop.epochs,
                                  steps=stop.steps).total_samples
    return int(round(WARM_START_FRACTION * total / opts.batch_size))


# ---- Sandblaster's defaults ----------------------------------------------------------------------------------------
# model: (batch size, None = the whole training set; L2 penalty; iterations on one batch before drawing the next;
#         --max-iter; compute dtype).  The convex logreg runs full-batch to its tolerances in float64, where L-BFGS
#         reaches the optimum that a single-process run reaches (float32 line searches stall ~1e-5 away from it).
_LBFGS_DEFAULTS = {"logreg": (None, 1e-4, 1, 1000, numpy.float64), "speech_cnn": (256, 1e-4, 3, 100, numpy.float32),
                   "mnist_cnn": (256, 1e-4, 3, 100, numpy.float32)}
_LBFGS_USER_MODEL = (256, 1e-4, 3, 100, numpy.float32)
MINI_SHARDS_PER_REPLICA = 8


def sandblaster_defaults(opts, n_train: int, size: int, model_name: str = "model") -> dict:
    """Return the effective batch_size, mini_shard_size, l2, iterations_per_batch, max_iter and dtype of
    SandblasterOptions ``opts`` (None options: the defaults of ``model_name``; user models get the CNNs' 256-example
    batches in float32)."""
    batch, l2, per_batch, max_iter, dtype = _LBFGS_DEFAULTS.get(model_name, _LBFGS_USER_MODEL)
    batch = opts.batch_size if opts.batch_size is not None else (n_train if batch is None else batch)
    batch = min(batch, n_train) if opts.batch_size is None else batch
    ms = opts.mini_shard_size
    if ms is None:
        ms = max(1, batch // (MINI_SHARDS_PER_REPLICA * size))
    return {"batch_size": int(batch), "mini_shard_size": int(ms), "l2": float(opts.l2 if opts.l2 is not None else l2),
            "iterations_per_batch": int(per_batch) if batch < n_train else 1,
            "max_iter": int(opts.max_iter if opts.max_iter is not None else max_iter), "dtype": dtype}


def check_sandblaster(opts, n_train: int, size: int, model_name: str = "model", stop=None) -> dict:
    """Check SandblasterOptions ``opts`` (and the ``Stop``) against the data and the job size before any work;
    return the effective settings (see ``sandblaster_defaults``).  Raises OptionError naming the field."""
    eff = sandblaster_defaults(opts, n_train, size, model_name)
    if eff["batch_size"] > n_train:
        raise OptionError("batch_size", f"{eff['batch_size']} exceeds the {n_train} training examples; "
                                        f"use at most {n_train} (or leave it unset for the whole set)")
    if eff["mini_shard_size"] > eff["batch_size"]:
        raise OptionError("mini_shard_size", f"{eff['mini_shard_size']} is larger than the batch "
                                             f"({eff['batch_size']} examples); use at most the batch size")
    ranks_in_job("slow_ranks", opts.slow_ranks, size)
    if stop is not None and (stop.epochs is not None or stop.steps is not None):
        raise OptionError("epochs" if stop.epochs is not None else "steps",
                          "does not apply to sandblaster, which stops on max_iter, grad_tol, loss_tol, "
                          "time_limit or target_accuracy; leave it unset")
    return eff


def network_dtype(mode: str, model_name: str):
    """The dtype the run's networks compute in: float64 for Sandblaster's convex logreg, else float32."""
    if mode != "sandblaster":
        return numpy.float32
    return _LBFGS_DEFAULTS.get(model_name, _LBFGS_USER_MODEL)[4]


# ---- rules that need the mode or the job size ---------------------------------------------------------------------
def check_inputs(mode, options, stop, checkpoint):
    """The types of a run's inputs and the rules between them; return ``(options, stop)`` (None: the defaults).

    ValueError for an unknown mode, TypeError for options of another mode, OptionError for a rule between option
    sets (checkpoints outside the resumable modes; patience without a validation split; a stop file outside
    Downpour or without a checkpoint)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    cls = OPTIONS[mode]
    if options is None:
        options = cls()
    # Downpour options are SGD options too, but serial/sync ignore their Downpour fields: refuse them plainly
    if not isinstance(options, cls) or (cls is SGDOptions and type(options) is not SGDOptions):
        raise TypeError(f"--mode {mode} takes {cls.__name__}, got {type(options).__name__}")
    stop = Stop() if stop is None else stop
    if not isinstance(stop, Stop):
        raise TypeError(f"stop must be a Stop, got {type(stop).__name__}")
    if checkpoint is not None and not isinstance(checkpoint, CheckpointOptions):
        raise TypeError(f"checkpoint must be CheckpointOptions or None, got {type(checkpoint).__name__}")
    if mode not in RESUMABLE_MODES and checkpoint is not None and checkpoint != CheckpointOptions():
        raise OptionError("checkpoint", f"works with --mode downpour, sync and serial, not {mode}")
    if stop.patience is not None and (mode == "sandblaster" or options.validation == 0):
        raise OptionError("patience", "needs a validation split (validation > 0; modes serial, sync, downpour)")
    if stop.stop_file is not None:  # asyncsgd.runtime.stop_request: Downpour's monitor loop polls it
        if mode != "downpour":
            raise OptionError("stop_file", f"applies to --mode downpour only; --mode {mode} runs to its limits "
                                           f"(jobs/README.md, 'Time limits and requeue')")
        # a checkpoint file is written exactly when asyncsgd.algorithms.resume.checkpoint_path names one
        if checkpoint is None or (checkpoint.path is None and checkpoint.every is None and checkpoint.resume != "auto"):
            raise OptionError("stop_file", "needs a checkpoint to stop into: give --checkpoint FILE (and "
                                           "--resume auto, so that the next run continues from it)")
    return options, stop


def ranks_in_job(field: str, ranks: Mapping, size: int) -> None:
    """OptionError unless every rank that ``field`` ({rank: ...}) names is a rank of a job of ``size``."""
    bad = [r for r in ranks if r >= size]
    if bad:
        raise OptionError(field, f"names rank {bad[0]} but the job has ranks 0..{size - 1}")


def check_job_size(mode: str, size: int, *, servers: int = 1, kill_ranks: Mapping = MappingProxyType({})) -> None:
    """The rank-count rules: serial is one process, downpour and sync need 2 ranks or more, Downpour's servers
    leave a worker, ``kill_ranks`` names ranks of the job (Sandblaster's ``slow_ranks``: ``check_sandblaster``)."""
    if mode == "serial" and size != 1:
        raise ValueError("--mode serial runs in one process; start it without mpiexec "
                         "(or choose --mode downpour, sync or sandblaster)")
    if mode in ("downpour", "sync") and size < 2:
        raise ValueError(f"--mode {mode} needs at least 2 MPI ranks (1 server + 1 worker), got {size}; "
                         f"run under mpiexec -n 6, or use --mode serial")
    if mode == "downpour" and servers >= size:
        raise OptionError("servers", f"{servers} leaves no worker among {size} ranks; use at most {size - 1}")
    ranks_in_job("kill_ranks", kill_ranks, size)


# ---- the plan ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class JobShape:
    """What the mode, the options and the job size decide before any data is read (``plan_job``)."""
    mode: str
    size: int             # ranks in the job (1: serial)
    workers: int          # replicas: Downpour's non-server ranks; every rank in sync and sandblaster
    servers: int          # ranks hosting Downpour's shards (0 in serial and sync; every rank in sandblaster)
    fault_tolerant: bool  # runs through dead ranks (asyncsgd.ulfm.policy.resolve; docs/FAULT_TOLERANCE.md)
    store: str            # Downpour's store transport, "rma" or "messages" (ASYNCSGD_STORE); "rma" elsewhere


def plan_job(mode, options, stop, checkpoint, size: int) -> JobShape:
    """Check the inputs against each other and the job size; resolve the store transport and fault tolerance.

    ``options`` and ``stop`` as ``check_inputs`` returned them.  Raises ValueError (OptionError naming a field)."""
    store = "rma"
    if mode == "downpour":  # the store transport (ASYNCSGD_STORE, docs/NETWORK.md) is read here, once per run
        from asyncsgd.runtime.env import store_transport
        store = store_transport()
        if store == "messages" and options.optimizer == "adagrad":
            raise OptionError("optimizer", "adagrad needs the RMA store: unset ASYNCSGD_STORE=messages "
                                           "(the served store applies plain SGD deltas)")
    fault_tolerant = False
    if mode != "serial":  # fault tolerance (docs/FAULT_TOLERANCE.md): 'on' needs ULFM
        from asyncsgd.ulfm.policy import resolve
        try:
            fault_tolerant = resolve(options.fault_tolerance, options.optimizer if mode == "downpour" else "sgd",
                                     store=store)
        except ValueError as exc:
            raise OptionError("fault_tolerance", str(exc)) from None
    check_job_size(mode, size, servers=options.servers if mode == "downpour" else 1,
                   kill_ranks=options.kill_ranks if mode != "serial" else {})
    servers = {"downpour": options.servers if mode == "downpour" else 0, "sandblaster": size}.get(mode, 0)
    workers = size - servers if mode == "downpour" else size
    return JobShape(mode, size, workers, servers, bool(fault_tolerant), store)


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """Every run-level fact, resolved once by ``plan_run``; the algorithms read it and re-derive nothing.

    ``options`` and ``stop`` are the given ones with the model's defaults filled in (SGD modes: ``sgd_defaults``
    with the job's replica counts; Sandblaster's effective settings are ``lbfgs``); ``config`` is the run's options
    as given, as one plain dict (what the summary, the model file and the checkpoints record).
    """
    job: JobShape
    model_name: str
    options: object
    stop: Stop
    config: Mapping
    n_train: int = 0                 # training rows after the validation split (SGD modes)
    warm_start_steps: int = 0        # Downpour: steps worker 0 takes alone first
    overlap: str = "off"             # Downpour: what travels in a communication thread as the workers run it
    overlap_off_reason: str | None = None  # why a requested overlap is off (the workers warn with it)
    lbfgs: Mapping | None = None     # Sandblaster: batch_size, mini_shard_size, l2, iterations_per_batch, max_iter

    @property
    def mode(self) -> str:
        return self.job.mode

    @property
    def size(self) -> int:
        return self.job.size

    @property
    def workers(self) -> int:
        return self.job.workers

    @property
    def servers(self) -> int:
        return self.job.servers

    @property
    def fault_tolerant(self) -> bool:
        return self.job.fault_tolerant

    @property
    def store(self) -> str:
        return self.job.store


def plan_run(job: JobShape, options, stop, *, src, model_name: str, n_params: int | None = None,
             resumed: bool = False) -> RunPlan:
    """Check the options against the data (and the network's size); fill the defaults; return the RunPlan.

    ``src`` the run's DataSource, ``n_params`` the network's parameter count (None: not checked), ``resumed``
    whether the run continues from a checkpoint (no warm start then).  Raises OptionError naming the field."""
    mode = job.mode
    config = MappingProxyType({"mode": mode, "model": model_name, "data": src.name,
                               **options_to_dict(options, stop)})
    if mode == "sandblaster":
        eff = check_sandblaster(options, src.n_train, job.size, model_name, stop)
        lbfgs = MappingProxyType({k: v for k, v in eff.items() if k != "dtype"})
        return RunPlan(job, model_name, options, stop, config, n_train=int(src.n_train), lbfgs=lbfgs)
    n_train = _training_rows(options.validation, src, job.workers)
    filled, limits = sgd_defaults(options, stop, model_name,
                                  async_replicas=job.workers if mode == "downpour" else 1,
                                  sync_replicas=job.size if mode == "sync" else 1)
    if not filled.lr_schedule.is_constant and all(v is None for v in (limits.epochs, limits.steps,
                                                                          limits.time_limit)):
        raise OptionError("lr_schedule", f"{options.lr_schedule} needs the run's length: set epochs, steps or "
                                         f"time_limit (a target accuracy alone does not say when the run ends), "
                                         f"or use 'constant'")
    if mode != "downpour":
        return RunPlan(job, model_name, filled, limits, config, n_train=n_train)
    if n_params is not None and options.servers > n_params:
        raise OptionError("servers", f"{options.servers} is more shards than the model's {n_params} parameters")
    warm = warm_start_steps(filled, limits, n_train=n_train, workers=job.workers, resumed=resumed)
    overlap, why = options.overlap, None
    if overlap != "off":
        from asyncsgd.algorithms.downpour.overlap import overlap_refusal
        why = overlap_refusal(fault_tolerant=job.fault_tolerant)
        overlap = "off" if why is not None else overlap
    return RunPlan(job, model_name, filled, limits, config, n_train=n_train, warm_start_steps=warm,
                   overlap=overlap, overlap_off_reason=why)


def _training_rows(fraction: float, src, workers: int) -> int:
    """The training rows left after the validation split; OptionError unless every worker gets one (the same
    count as ``asyncsgd.algorithms.common.TrainingSplit``)."""
    from asyncsgd.data.holdout import class_counts
    labels = numpy.asarray(src.train_labels())
    n_val = int(class_counts(fraction, numpy.bincount(labels)).sum()) if labels.size else 0
    if labels.size - n_val < workers:
        raise OptionError("validation", f"{fraction:g} leaves {labels.size - n_val} training rows for "
                                        f"{workers} workers; use a smaller fraction (0 = none) or more data")
    return int(labels.size - n_val)


def plan_for(mode, comm, src, options, stop, *, model_name: str = "model", n_params: int | None = None,
             resumed: bool = False, checkpoint=None) -> RunPlan:
    """Both steps at once, for a caller of an algorithm's ``run`` that has no plan (``api.prepare`` makes one)."""
    options, stop = check_inputs(mode, options, stop, checkpoint)
    job = plan_job(mode, options, stop, checkpoint, 1 if comm is None else comm.size)
    return plan_run(job, options, stop, src=src, model_name=model_name, n_params=n_params, resumed=resumed)
