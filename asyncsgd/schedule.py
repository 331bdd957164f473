"""Learning-rate schedules as functions of the run's progress, and Downpour's global progress.

A schedule is a small frozen object: ``schedule.rate(progress) -> lr`` for ``progress`` in [0, 1], the fraction of
the run done (values outside are clipped).  ``lr`` is the schedule's peak rate (``--lr``, or the mode's default);
``schedule.with_lr(lr)`` returns the same shape with another peak, so a schedule can be parsed and validated before
the default rate is known (``sgd_defaults`` scales it with the number of Downpour replicas).

Grammar of ``--lr-schedule`` (and of ``lr_schedule`` in a TOML config file); spaces are ignored::

    SPEC    := [ "warmup:" W "+" ] DECAY  |  "warmup:" W
    DECAY   := "constant"                      lr throughout (the default; today's behaviour)
             | "cosine" [ ":" FLOOR ]          lr * (FLOOR + (1 - FLOOR) * (1 + cos(pi * p)) / 2)
             | "linear" [ ":" FLOOR ]          lr * (1 - (1 - FLOOR) * p)
             | "step:" GAMMA "@" M ("," M)*    lr * GAMMA ** (number of milestones M <= p)

``W`` is the warm-up's share of the run (0 <= W < 1): the rate rises linearly from ``WARMUP_START`` x to 1 x the
decay's rate over [0, W]; the decay sees the run's progress unchanged (its milestones are fractions of the whole run,
not of the part after the warm-up).  ``FLOOR`` (0 <= FLOOR <= 1, default 0) is the final rate as a fraction of lr.
``GAMMA`` (0 < GAMMA <= 1) multiplies the rate at each milestone; milestones are increasing fractions in (0, 1).
``--warmup W`` is the same as the prefix ``warmup:W+``.  Examples::

    constant                    cosine                      cosine:0.05
    step:0.1@0.5,0.75           warmup:0.05+cosine          warmup:0.1          (warm-up, then constant)

Progress.  Serial and sync runs know their own position (samples done / samples budgeted).  In Downpour each worker
reads the store's version (the global push count) at every fetch; :func:`global_progress` turns it into the same
fraction on every worker, so asynchronous replicas decay together whatever their own speed: two workers that fetched
the same version apply the same rate.  With only a time limit, progress is ``elapsed / time_limit``.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

__all__ = ["Schedule", "Constant", "Cosine", "Linear", "StepDecay", "Warmup", "parse_schedule", "RunBudget",
           "global_progress", "WARMUP_START"]

# Rate at the start of a warm-up, as a fraction of the peak: not 0, so the first fetch-push cycle moves the model.
WARMUP_START = 0.1


def _clip(progress: float) -> float:
    p = float(progress)
    if math.isnan(p):
        raise ValueError("progress is NaN: pass the fraction of the run done, in [0, 1]")
    return min(1.0, max(0.0, p))


def _check_lr(lr) -> float:
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    return float(lr)


def _count(name: str, value, minimum: int) -> int:
    """Return ``value`` as an int >= ``minimum`` (numpy integers welcome), else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_fraction(name: str, value, *, low_open: bool = False, high_open: bool = False) -> float:
    """Return ``value`` as a float in [0, 1] (bounds excluded where asked), else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if v < 0 or v > 1 or (low_open and v == 0) or (high_open and v == 1):
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lo}0, 1{hi}, got {value!r}")
    return v


class Schedule:
    """Base of every schedule: ``rate(progress)`` = ``lr * factor(progress)``; also callable."""

    lr: float

    def factor(self, progress: float) -> float:
        """Return the rate at ``progress`` as a fraction of the peak ``lr`` (progress already clipped)."""
        raise NotImplementedError

    def rate(self, progress: float) -> float:
        """Return the learning rate at ``progress``, the fraction of the run done (clipped to [0, 1])."""
        return self.lr * self.factor(_clip(progress))

    __call__ = rate

    def with_lr(self, lr: float) -> "Schedule":
        """Return the same schedule with peak rate ``lr``."""
        return dataclasses.replace(self, lr=lr)

    @property
    def is_constant(self) -> bool:
        """True when the rate never changes (trainers may skip computing progress)."""
        return False


@dataclasses.dataclass(frozen=True)
class Constant(Schedule):
    """The same rate for the whole run."""

    lr: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "lr", _check_lr(self.lr))

    def factor(self, progress):
        return 1.0

    @property
    def is_constant(self):
        return True

    def __str__(self):
        return "constant"


@dataclasses.dataclass(frozen=True)
class Cosine(Schedule):
    """Half a cosine from ``lr`` at progress 0 to ``floor * lr`` at progress 1 (Loshchilov & Hutter, no restarts)."""

    lr: float = 1.0
    floor: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "lr", _check_lr(self.lr))
        object.__setattr__(self, "floor", _check_fraction("cosine floor", self.floor))

    def factor(self, progress):
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def __str__(self):
        return "cosine" if self.floor == 0 else f"cosine:{self.floor:g}"


@dataclasses.dataclass(frozen=True)
class Linear(Schedule):
    """A straight line from ``lr`` at progress 0 to ``floor * lr`` at progress 1."""

    lr: float = 1.0
    floor: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "lr", _check_lr(self.lr))
        object.__setattr__(self, "floor", _check_fraction("linear floor", self.floor))

    def factor(self, progress):
        return 1.0 - (1.0 - self.floor) * progress

    def __str__(self):
        return "linear" if self.floor == 0 else f"linear:{self.floor:g}"


@dataclasses.dataclass(frozen=True)
class StepDecay(Schedule):
    """``lr * gamma ** k`` where k is the number of milestones (fractions of the run) already reached."""

    lr: float = 1.0
    gamma: float = 0.1
    milestones: tuple = (0.5, 0.75)

    def __post_init__(self):
        object.__setattr__(self, "lr", _check_lr(self.lr))
        object.__setattr__(self, "gamma", _check_fraction("step gamma", self.gamma, low_open=True))
        ms = tuple(_check_fraction("step milestone", m, low_open=True, high_open=True) for m in self.milestones)
        if not ms:
            raise ValueError("step milestones must name at least one fraction of the run, e.g. step:0.1@0.5")
        if any(b <= a for a, b in zip(ms, ms[1:])):
            raise ValueError(f"step milestones must be strictly increasing, got {', '.join(f'{m:g}' for m in ms)}")
        object.__setattr__(self, "milestones", ms)

    def factor(self, progress):
        reached = sum(1 for m in self.milestones if progress >= m)
        return self.gamma ** reached

    def __str__(self):
        return f"step:{self.gamma:g}@{','.join(f'{m:g}' for m in self.milestones)}"


@dataclasses.dataclass(frozen=True)
class Warmup(Schedule):
    """A linear ramp from ``start`` x to 1 x the inner schedule's rate over the first ``fraction`` of the run.

    The inner schedule sees the run's progress unchanged, so ``warmup:0.05+step:0.1@0.5`` still decays at half the
    run.  Its peak rate is the inner schedule's (``lr`` reads and sets it).
    """

    inner: Schedule = dataclasses.field(default_factory=Constant)
    fraction: float = 0.05
    start: float = WARMUP_START

    def __post_init__(self):
        if not isinstance(self.inner, Schedule) or isinstance(self.inner, Warmup):
            raise ValueError(f"warm-up inner schedule must be a decay schedule (constant, cosine, linear, step), "
                             f"got {self.inner!r}")
        object.__setattr__(self, "fraction", _check_fraction("warmup", self.fraction, high_open=True))
        object.__setattr__(self, "start", _check_fraction("warmup start", self.start))

    @property
    def lr(self):
        return self.inner.lr

    def with_lr(self, lr):
        return dataclasses.replace(self, inner=self.inner.with_lr(lr))

    def factor(self, progress):
        ramp = 1.0 if progress >= self.fraction else self.start + (1.0 - self.start) * progress / self.fraction
        return ramp * self.inner.factor(progress)

    @property
    def is_constant(self):
        return self.fraction == 0 and self.inner.is_constant

    def __str__(self):
        return f"warmup:{self.fraction:g}+{self.inner}"


def _number(text: str, what: str, spec: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"lr schedule {spec!r}: {what} must be a number, got {text!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"lr schedule {spec!r}: {what} must be finite, got {text!r}")
    return v


def _parse_decay(text: str, spec: str) -> Schedule:
    name, _, arg = text.partition(":")
    try:
        if name == "constant" and not arg:
            return Constant()
        if name in ("cosine", "linear"):
            cls = Cosine if name == "cosine" else Linear
            return cls(floor=_number(arg, f"{name} floor", spec)) if arg else cls()
        if name == "step":
            if "@" not in arg:
                raise ValueError("step needs GAMMA@M1,M2,... (e.g. step:0.1@0.5,0.75)")
            gamma, _, ms = arg.partition("@")
            return StepDecay(gamma=_number(gamma, "step gamma", spec),
                             milestones=tuple(_number(m, "step milestone", spec) for m in ms.split(",")))
    except ValueError as exc:
        msg = str(exc)
        raise ValueError(msg if msg.startswith("lr schedule") else f"lr schedule {spec!r}: {msg}") from None
    raise ValueError(f"lr schedule {spec!r}: unknown schedule {text!r}; use constant, cosine[:FLOOR], "
                     f"linear[:FLOOR] or step:GAMMA@M1,M2,..., optionally after warmup:W+ "
                     f"(e.g. warmup:0.05+cosine)")


def parse_schedule(spec: str, *, lr: float = 1.0, warmup: float | None = None) -> Schedule:
    """Parse a ``--lr-schedule`` string (grammar in the module docstring) into a Schedule with peak rate ``lr``.

    ``warmup`` (``--warmup W``) adds a warm-up over the first W of the run; giving it as well as a ``warmup:``
    prefix is an error.  Raises ValueError naming the part that is wrong.
    """
    if not isinstance(spec, str):
        raise ValueError(f"lr schedule must be a string such as 'cosine' or 'warmup:0.05+cosine', got {spec!r}")
    text = "".join(spec.split()).lower()
    if not text:
        raise ValueError("lr schedule is empty: use constant, cosine, linear, step:GAMMA@M1,... or warmup:W+...")
    head, plus, rest = text.partition("+")
    prefix = None
    if head.startswith("warmup:"):
        prefix = _number(head[len("warmup:"):], "warmup", spec)
        text = rest if plus else "constant"
        if not text:
            raise ValueError(f"lr schedule {spec!r}: nothing after '+'; e.g. warmup:0.05+cosine")
    elif plus:
        raise ValueError(f"lr schedule {spec!r}: only a warm-up may come before '+', e.g. warmup:0.05+cosine")
    if "+" in text:
        raise ValueError(f"lr schedule {spec!r}: one decay at most after the warm-up, e.g. warmup:0.05+cosine")
    decay = _parse_decay(text, spec)
    if prefix is not None and warmup is not None:
        raise ValueError(f"warmup is given twice: in the lr schedule {spec!r} and as --warmup {warmup}; keep one")
    fraction = prefix if prefix is not None else warmup
    if fraction is not None:
        try:
            fraction = _check_fraction("warmup", fraction, high_open=True)
        except ValueError as exc:
            raise ValueError(f"lr schedule {spec!r}: {exc}") from None
    schedule = Warmup(decay, fraction=fraction) if fraction else decay  # warmup 0 is no warm-up
    return schedule.with_lr(lr)


@dataclasses.dataclass(frozen=True)
class RunBudget:
    """How long the run is, in global samples and/or seconds; ``fraction()`` is the progress the schedule reads.

    ``total_samples`` counts samples over all workers (epochs x training rows, or steps x workers x batch, the
    smaller when both are set); ``time_limit`` is in seconds.  Whichever limit is nearer decides the fraction, as it
    decides when the run stops (``StopRule``).  At least one of the two must be set.
    """

    total_samples: int | None = None
    time_limit: float | None = None

    def __post_init__(self):
        if self.total_samples is not None:
            object.__setattr__(self, "total_samples", _count("total_samples", self.total_samples, 1))
        if self.time_limit is not None and not (isinstance(self.time_limit, numbers.Real)
                                                and math.isfinite(self.time_limit) and self.time_limit > 0):
            raise ValueError(f"time_limit must be a number of seconds > 0, got {self.time_limit!r}")
        if self.total_samples is None and self.time_limit is None:
            raise ValueError("a learning-rate schedule needs the run's length: set --epochs, --steps or --time-limit")

    @classmethod
    def from_limits(cls, *, n_train: int, batch_size: int, workers: int = 1, epochs: float | None = None,
                    steps: int | None = None, time_limit: float | None = None) -> "RunBudget":
        """Return the budget of a run stopped by --epochs (of ``n_train`` rows), --steps per worker, --time-limit."""
        n_train, batch_size = _count("n_train", n_train, 1), _count("batch_size", batch_size, 1)
        workers = _count("workers", workers, 1)
        totals = []
        if epochs is not None:
            totals.append(int(math.ceil(epochs * n_train)))
        if steps is not None:
            totals.append(_count("steps", steps, 1) * workers * batch_size)
        return cls(total_samples=min(totals) if totals else None, time_limit=time_limit)

    def fraction(self, samples: float = 0, elapsed: float = 0.0) -> float:
        """Return the progress in [0, 1] after ``samples`` global samples and ``elapsed`` seconds."""
        parts = []
        if self.total_samples is not None:
            parts.append(samples / self.total_samples)
        if self.time_limit is not None:
            parts.append(elapsed / self.time_limit)
        return _clip(max(parts))


def global_progress(pushes_seen: int, budget: RunBudget, *, batch_size: int, n_push: int,
                    elapsed: float = 0.0, samples_before: int = 0) -> float:
    """Return Downpour's global progress from the store version a worker saw at its fetch.

    Every push carries ``n_push`` steps of ``batch_size`` samples, so ``pushes_seen`` (``store.fetch``'s return
    value: pushes by every worker so far) stands for ``pushes_seen * batch_size * n_push`` samples, plus
    ``samples_before`` done before a ``--resume`` (the version counter restarts at 0).  The result depends only on
    the arguments, never on the worker: two workers that saw the same version apply the same rate.  A worker's last
    push may carry fewer than ``n_push`` steps; that over-counts by less than one push per worker.
    """
    samples = (_count("samples_before", samples_before, 0)
               + _count("pushes_seen", pushes_seen, 0) * _count("batch_size", batch_size, 1) * _count("n_push", n_push, 1))
    return budget.fraction(samples, elapsed)
