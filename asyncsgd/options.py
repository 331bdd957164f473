"""Options of the training API: frozen dataclasses, each checked when it is made.

    from asyncsgd import DownpourOptions, Stop, ExponentialDecay
    opts = DownpourOptions(lr=0.004, n_push=4, sparsity=0.1, staleness=ExponentialDecay(0.9))
    stop = Stop(epochs=30, target_accuracy=0.97)

A bad value raises ``OptionError`` (a ValueError) naming the field and what to do; the command line turns the field
into its ``--flag``.  Every rule about one option set's values lives here; the rules that need the mode, the job size
or the data live in ``asyncsgd.plan``.  ``None`` means "the model's default" (``asyncsgd.plan.sgd_defaults`` and
``asyncsgd.plan.sandblaster_defaults``): the run's plan holds the filled-in copy, the options given stay as they
were.  The attribute names are the command line's option names with underscores (``n_push``, ``mini_shard_size``).

Policies are objects, not strings: ``staleness`` is any callable ``tau -> factor`` (``NoDecay()``,
``InverseDecay()``, ``ExponentialDecay(lam)`` or your own); ``lr_schedule`` a ``Schedule`` of asyncsgd.schedule
(``Cosine()``, ``Warmup(Cosine(), 0.05)``, ...; its peak is ``lr``), or the command line's string for one
(``'warmup:0.05+cosine'``), parsed when the options are made.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping

from asyncsgd.schedule import Schedule, parse_schedule

__all__ = ["OptionError", "Stop", "SGDOptions", "DownpourOptions", "SandblasterOptions", "CheckpointOptions",
           "NoDecay", "InverseDecay", "ExponentialDecay", "parse_staleness", "options_to_dict", "OPTIMIZERS",
           "SCHEDULES", "DEFAULT_LR_SCHEDULE", "DEFAULT_VALIDATION", "DEFAULT_SELECTION_MARGIN"]

OPTIMIZERS = ("sgd", "adagrad")
SCHEDULES = ("dynamic", "static")
OVERLAP = ("off", "push", "all")  # what travels in a worker's communication thread (algorithms.downpour.overlap)
FAULT_TOLERANCE = ("auto", "on", "off")  # Downpour's run-through of a dead rank (docs/FAULT_TOLERANCE.md)
# The SGD modes' defaults (README, "Benchmarks": five seeds each): a 5% warm-up then a cosine decay to 0, so a run
# ends at a low rate instead of wherever a constant rate's oscillation lands; and a tenth of the training set held
# out to choose the model with (asyncsgd.data.holdout explains the fraction).
DEFAULT_LR_SCHEDULE = "warmup:0.05+cosine"
DEFAULT_VALIDATION = 0.1
# The best-validation model is selected over the last one only when it is better by more than this many standard
# errors of the difference (asyncsgd.algorithms.best_model: a winner's curse on a few hundred validation rows).
DEFAULT_SELECTION_MARGIN = 2.0


class OptionError(ValueError):
    """A bad option value; ``field`` is the option's attribute name (the command line shows it as ``--field``)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field} {message}")
        self.field = field
        self.detail = message


# ---- staleness rules ---------------------------------------------------------------------------------------------
class NoDecay:
    """Every push counts in full, whatever its staleness."""
    spec = "none"

    def __call__(self, tau: int) -> float:
        return 1.0

    def __repr__(self):
        return "NoDecay()"

    def __eq__(self, other):
        return type(other) is NoDecay


class InverseDecay:
    """Scale a push of staleness tau by 1/tau (tau >= 1; a fresh push counts in full)."""
    spec = "inverse"

    def __call__(self, tau: int) -> float:
        return 1.0 / max(tau, 1)

    def __repr__(self):
        return "InverseDecay()"

    def __eq__(self, other):
        return type(other) is InverseDecay


class ExponentialDecay:
    """Scale a push of staleness tau by lam**tau (Chan & Lane 2014), 0 < lam <= 1."""

    def __init__(self, lam: float):
        if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not 0 < lam <= 1:
            raise OptionError("staleness", f"decay factor must be a number in (0, 1], got {lam!r}")
        self.lam = float(lam)
        self.spec = f"exp:{self.lam:g}"

    def __call__(self, tau: int) -> float:
        return self.lam ** tau

    def __repr__(self):
        return f"ExponentialDecay({self.lam:g})"

    def __eq__(self, other):
        return type(other) is ExponentialDecay and other.lam == self.lam


def parse_staleness(spec: str):
    """Return the staleness rule of a command-line spec: 'none', 'inverse' or 'exp:LAMBDA' (0 < LAMBDA <= 1)."""
    if spec == "none":
        return NoDecay()
    if spec == "inverse":
        return InverseDecay()
    if isinstance(spec, str) and spec.startswith("exp:"):
        try:
            return ExponentialDecay(float(spec[4:]))
        except (ValueError, OptionError):
            pass
    raise OptionError("staleness_decay", f"must be none, inverse or exp:LAMBDA with 0 < LAMBDA <= 1, got {spec!r}")


# ---- field checks ------------------------------------------------------------------------------------------------
def _int(obj, field, lo, *, optional=False):
    v = getattr(obj, field)
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
        raise OptionError(field, f"must be an integer >= {lo}{' or None (default)' if optional else ''}, got {v!r}")


def _real(obj, field, *, lo=None, lo_open=False, hi=None, hi_open=False, optional=False):
    v = getattr(obj, field)
    if v is None and optional:
        return
    ok = not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(v)
    ok = ok and (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or (v < hi if hi_open else v <= hi))
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}" \
              f"{')' if hi_open or hi is None else ']'}"
        raise OptionError(field, f"must be a number in {rng}{' or None (default)' if optional else ''}, got {v!r}")


def _choice(obj, field, choices):
    v = getattr(obj, field)
    if v not in choices:
        raise OptionError(field, f"must be one of {', '.join(choices)}, got {v!r}")


# ---- the option sets ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Stop:
    """When training ends: whichever limit is reached first.  With none given, SGD modes train the model's default
    number of epochs and Sandblaster runs to its ``max_iter`` / tolerances.

    ``epochs`` counts passes over the whole training set (all workers together; the rows left after the
    validation split); ``steps`` mini-batch steps per worker; ``time_limit`` seconds; ``target_accuracy`` in (0, 1]:
    the validation accuracy when a validation split is held out (test accuracy otherwise, and in Sandblaster);
    ``patience``: stop after this many evaluations in a row without a better validation accuracy (SGD modes with a
    validation split; None: never).  ``stop_file`` (Downpour, with a checkpoint): a file whose appearance ends the
    run cleanly, or a SIGTERM to its ranks: the workers end their step, rank 0 writes the checkpoint and the summary
    says ``stop_reason`` 'preempted' (asyncsgd.runtime.stop_request; the job scripts create it before SLURM's time
    limit and requeue the job, which resumes).
    """
    epochs: float | None = None
    steps: int | None = None
    time_limit: float | None = None
    target_accuracy: float | None = None
    patience: int | None = None
    stop_file: str | None = None

    def __post_init__(self):
        _real(self, "epochs", lo=0, lo_open=True, optional=True)
        _int(self, "steps", 1, optional=True)
        _real(self, "time_limit", lo=0, lo_open=True, optional=True)
        _real(self, "target_accuracy", lo=0, lo_open=True, hi=1, optional=True)
        _int(self, "patience", 1, optional=True)
        if self.stop_file is not None and (not isinstance(self.stop_file, str) or not self.stop_file):
            raise OptionError("stop_file", f"must be a file path or None, got {self.stop_file!r}")

    def is_set(self) -> bool:
        """True when a limit on the run's length or a target is given (patience alone does not end a run in time)."""
        return any(v is not None for v in (self.epochs, self.steps, self.time_limit, self.target_accuracy))


def _check_fault_tolerance(options):
    """``fault_tolerance`` auto/on/off and ``kill_ranks`` {rank: seconds >= 0} (docs/FAULT_TOLERANCE.md)."""
    _choice(options, "fault_tolerance", FAULT_TOLERANCE)
    if not isinstance(options.kill_ranks, Mapping) or not all(
            isinstance(r, numbers.Integral) and not isinstance(r, bool) and r >= 0
            and isinstance(t, numbers.Real) and math.isfinite(t) and t >= 0 for r, t in options.kill_ranks.items()):
        raise OptionError("kill_ranks", f"must map rank (int >= 0) to seconds of training (>= 0) after which "
                                        f"that rank kills itself, got {options.kill_ranks!r}")


@dataclasses.dataclass(frozen=True)
class SGDOptions:
    """Mini-batch SGD (``train_serial``, ``train_sync``; the base of ``DownpourOptions``).

    ``lr``, ``momentum`` and ``batch_size`` None take the model's defaults (``algorithms.common.sgd_defaults``: more
    than 3 Downpour replicas halve the batch and the rate).  ``optimizer`` 'adagrad' applies to
    Downpour's store.  ``augment``: 'auto' (time shifts on log-mel data), 'none' or 'shift:N'.  ``eval_every``:
    seconds between evaluations on rank 0.  ``lr_schedule``: the rate over the run, a Schedule or its string
    (asyncsgd.schedule; peak ``lr``); Downpour follows the store's global push count, so replicas decay together.
    ``validation``: the class-balanced fraction of the training set held out (0 <= F < 1; 0: none); the run's
    model is chosen, and ``Stop.target_accuracy`` / ``Stop.patience`` judged, on it; the test set is only reported.
    ``selection_margin``: the best-validation model is selected over the last only when better by more than this
    many standard errors (>= 0; 0: whenever better; asyncsgd.algorithms.best_model).
    """
    lr: float | None = None
    momentum: float | None = None
    batch_size: int | None = None
    optimizer: str = "sgd"
    adagrad_eps: float = 1e-6
    augment: str = "auto"
    seed: int = 0
    eval_every: float = 5.0
    lr_schedule: object = DEFAULT_LR_SCHEDULE
    validation: float = DEFAULT_VALIDATION
    selection_margin: float = DEFAULT_SELECTION_MARGIN
    # fault tolerance (docs/FAULT_TOLERANCE.md): 'auto' runs through a dead rank exactly when the job runs under
    # Open MPI's `mpirun --with-ft ulfm`; ``kill_ranks`` {rank: seconds >= 0} makes those ranks SIGKILL themselves
    # that long after training starts (a test and benchmark tool, like ``slow_ranks``)
    fault_tolerance: str = "auto"
    kill_ranks: Mapping = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        _check_fault_tolerance(self)
        sched = self.lr_schedule
        if isinstance(sched, str):
            try:
                sched = parse_schedule(sched)
            except ValueError as exc:
                raise OptionError("lr_schedule", str(exc).removeprefix("lr schedule ")) from None
            object.__setattr__(self, "lr_schedule", sched)
        elif not isinstance(sched, Schedule):
            raise OptionError("lr_schedule", f"must be a Schedule (asyncsgd.schedule: Constant(), Cosine(), "
                                             f"Warmup(Cosine(), 0.05), ...) or a string such as 'warmup:0.05+cosine', "
                                             f"got {sched!r}")
        v = self.validation
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v < 1:
            raise OptionError("validation", f"is the fraction of the training set held out, in [0, 1) (0 = none), "
                                            f"got {v!r}")
        _real(self, "selection_margin", lo=0)
        _real(self, "lr", lo=0, lo_open=True, optional=True)
        _real(self, "momentum", lo=0, hi=1, hi_open=True, optional=True)
        _int(self, "batch_size", 1, optional=True)
        _choice(self, "optimizer", OPTIMIZERS)
        _real(self, "adagrad_eps", lo=0, lo_open=True)
        a = self.augment
        if not isinstance(a, str) or not (a in ("auto", "none") or (a.startswith("shift:") and a[6:].isdigit())):
            raise OptionError("augment", f"must be auto, none or shift:N (N frames), got {a!r}")
        _int(self, "seed", 0)
        _real(self, "eval_every", lo=0, lo_open=True)


@dataclasses.dataclass(frozen=True)
class DownpourOptions(SGDOptions):
    """Downpour SGD: ``servers`` ranks host the parameter shards, the others are replicas that fetch every
    ``n_fetch`` steps and push every ``n_push``; ``sparsity`` < 1 pushes only that fraction of the entries (largest
    first, the rest kept as a residual); ``staleness`` scales each push (a callable tau -> factor);
    ``warm_start_steps`` are taken by one replica alone first (None: the first ``WARM_START_FRACTION`` of the
    run's samples, in steps of ``batch_size``; 0: none)."""
    servers: int = 1
    n_fetch: int = 1
    n_push: int = 1
    staleness: object = dataclasses.field(default_factory=NoDecay)
    sparsity: float = 1.0
    sparse_block: int = 1  # sparse pushes choose whole blocks of this many consecutive entries (1: single entries)
    overlap: str = "off"  # what travels in a communication thread while computing: off, push, all (pushes + fetches)
    warm_start_steps: int | None = None  # None: DistBelief's warm start over the first 9% of the run

    def __post_init__(self):
        super().__post_init__()
        _int(self, "servers", 1)
        _int(self, "n_fetch", 1)
        _int(self, "n_push", 1)
        if not callable(self.staleness):
            raise OptionError("staleness", f"must be a callable tau -> factor such as ExponentialDecay(0.9), "
                                           f"got {self.staleness!r}")
        v = self.sparsity
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 < v <= 1:
            raise OptionError("sparsity", f"must be in (0, 1] (fraction of entries pushed), got {v!r}")
        _int(self, "sparse_block", 1)
        _choice(self, "overlap", OVERLAP)
        _int(self, "warm_start_steps", 0, optional=True)


@dataclasses.dataclass(frozen=True)
class SandblasterOptions:
    """Sandblaster L-BFGS.  None values take the model's defaults (``asyncsgd.plan.sandblaster_defaults``):
    ``batch_size`` the L-BFGS batch, ``mini_shard_size`` the unit of work a replica claims, ``max_iter`` the
    iteration cap, ``l2`` the penalty l2/2 |x|^2.  ``schedule`` 'static' (an even split, for benchmarks) or
    'dynamic'; ``slow_ranks`` {rank: factor >= 1} makes ranks stragglers (tests and benchmarks only)."""
    batch_size: int | None = None
    mini_shard_size: int | None = None
    max_iter: int | None = None
    history: int = 10
    grad_tol: float = 1e-6
    loss_tol: float = 1e-10
    l2: float | None = None
    schedule: str = "dynamic"
    seed: int = 0
    slow_ranks: Mapping = dataclasses.field(default_factory=dict)
    fault_tolerance: str = "auto"  # run through a dead replica under `mpirun --with-ft ulfm` (as SGDOptions)
    kill_ranks: Mapping = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        _check_fault_tolerance(self)
        _int(self, "batch_size", 1, optional=True)
        _int(self, "mini_shard_size", 1, optional=True)
        _int(self, "max_iter", 1, optional=True)
        if isinstance(self.history, bool) or not isinstance(self.history, numbers.Integral) or self.history < 1:
            raise OptionError("history", f"must be >= 1 (L-BFGS needs at least one (s, y) pair), got {self.history!r}")
        _real(self, "grad_tol", lo=0)
        _real(self, "loss_tol", lo=0)
        _real(self, "l2", lo=0, optional=True)
        _choice(self, "schedule", SCHEDULES)
        _int(self, "seed", 0)
        if not isinstance(self.slow_ranks, Mapping) or not all(
                isinstance(r, numbers.Integral) and r >= 0 and isinstance(f, numbers.Real) and f >= 1
                for r, f in self.slow_ranks.items()):
            raise OptionError("slow_ranks", f"must map rank (int >= 0) to a slow-down factor >= 1, "
                                            f"got {self.slow_ranks!r}")


@dataclasses.dataclass(frozen=True)
class CheckpointOptions:
    """Periodic checkpoints (serial, sync, downpour): written to ``path`` every ``every`` seconds and at the end;
    ``resume`` a checkpoint file to continue from, or 'auto' (``path`` when it exists)."""
    path: str | None = None
    every: float | None = None
    resume: str | None = None

    def __post_init__(self):
        for field in ("path", "resume"):
            v = getattr(self, field)
            if v is not None and (not isinstance(v, str) or not v):
                raise OptionError(field, f"must be a file path or None, got {v!r}")
        _real(self, "every", lo=0, lo_open=True, optional=True)


def options_to_dict(*option_sets) -> dict:
    """Merge option dataclasses into one plain dict (policies by their spec, e.g. 'exp:0.9'), for logs and files."""
    out = {}
    for opts in option_sets:
        if opts is None:
            continue
        for f in dataclasses.fields(opts):
            v = getattr(opts, f.name)
            if f.name == "staleness":
                out["staleness_decay"] = getattr(v, "spec", repr(v))
                continue
            if isinstance(v, Schedule):
                v = str(v)  # a valid --lr-schedule spec again
            if isinstance(v, Mapping):
                v = ",".join(f"{r}:{x:g}" for r, x in sorted(v.items()))
            out[f.name] = v
    return out
