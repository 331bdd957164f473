"""Pieces every SGD trainer shares: when to stop, the validation split, evaluation on the validation and test sets
with the best-model tracker, and the learning-rate schedule's run budget.  The model's default hyper-parameters
(``sgd_defaults``) are filled once per run by asyncsgd.plan; the trainers read them from the RunPlan."""
from __future__ import annotations

import math
import time

import numpy

from asyncsgd.data.holdout import split_holdout
from asyncsgd.runtime.faults import fault_point
from asyncsgd.data.partition import class_strided_rows
from asyncsgd.schedule import RunBudget
from asyncsgd.algorithms.best_model import BestModelTracker

__all__ = ["options_as_trained", "StopRule", "Evaluator", "TrainingSplit", "Evaluations",
           "schedule_budget"]


class StopRule:
    """Decide when training ends from a ``Stop``: epochs (of the whole training set), steps, a time limit, a target
    accuracy.

    ``samples_budget`` is epochs x the samples this trainer is responsible for (a worker's slice, or all of them).
    """

    def __init__(self, stop, samples_per_epoch: int, start: float | None = None):
        self.max_samples = None if stop.epochs is None else int(math.ceil(stop.epochs * samples_per_epoch))
        self.max_steps = stop.steps
        self.time_limit = stop.time_limit
        self.target = stop.target_accuracy
        self.start = time.monotonic() if start is None else start
        self.reason = None

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def done(self, samples: int, steps: int, accuracy: float | None = None) -> bool:
        """Return True (and set ``reason``) once any limit is reached."""
        if self.max_samples is not None and samples >= self.max_samples:
            self.reason = "epochs"
        elif self.max_steps is not None and steps >= self.max_steps:
            self.reason = "steps"
        elif self.time_limit is not None and self.elapsed() >= self.time_limit:
            self.reason = "time-limit"
        elif self.target is not None and accuracy is not None and accuracy >= self.target:
            self.reason = "target-accuracy"
        return self.reason is not None

    def stop_early(self) -> bool:
        """Record that early stopping (``Stop.patience``) ended the run; return True."""
        self.reason = self.reason or "patience"
        return True

    def fraction(self, samples: int, steps: int) -> float | None:
        """Fraction of the run done, for the ETA, when a limit other than accuracy is known."""
        parts = []
        if self.max_samples:
            parts.append(samples / self.max_samples)
        if self.max_steps:
            parts.append(steps / self.max_steps)
        if self.time_limit:
            parts.append(self.elapsed() / self.time_limit)
        return min(1.0, max(parts)) if parts else None


class Evaluator:
    """Test-set loss and accuracy of a parameter vector, on a private replica (rank 0's)."""

    def __init__(self, net, x_test, y_test, backend):
        self.net = net
        self.x = backend.to_device(x_test)
        self.y = backend.to_device(y_test)
        self.backend = backend

    def __call__(self, params_host) -> tuple[float, float]:
        fault_point("evaluate")
        self.net.params[...] = self.backend.to_device(params_host)
        loss, acc = self.net.evaluate(self.x, self.y)
        return float(loss), float(acc)


class TrainingSplit:
    """The run's training rows and held-out validation rows (``SGDOptions.validation``), the same on every rank.

    Every rank computes the split itself from the training labels and the seed (asyncsgd.data.holdout), so no
    communication is needed and a resumed run gets the same split.  ``share(w, W)`` is worker w's class-strided
    share of the *training* rows (asyncsgd.data.partition): disjoint, covering, never a validation row.  With fraction 0
    every row trains and ``share`` is exactly ``DataSource.train_slice``.
    """

    def __init__(self, src, fraction: float, seed: int):
        self.src = src
        self.labels = numpy.asarray(src.train_labels(), dtype=numpy.int64)
        self.train_rows, self.validation_rows = split_holdout(self.labels, fraction, seed=seed)
        self.n_train = int(self.train_rows.size)
        self.n_validation = int(self.validation_rows.size)

    def share_rows(self, part: int, n_parts: int):
        """Return worker ``part``'s training rows (file row indices, ascending)."""
        if n_parts > self.n_train:
            raise ValueError(f"cannot split {self.n_train} training rows among {n_parts} workers: use fewer "
                             f"workers, a smaller --validation or more data")
        local = class_strided_rows(self.labels[self.train_rows], int(part), int(n_parts))
        return self.train_rows[local]

    def share(self, part: int, n_parts: int):
        """Return (x float32, y int64): worker ``part``'s share of the training rows."""
        if self.n_validation == 0:
            return self.src.train_slice(part, n_parts)
        fault_point("data")
        return self.src.train_rows(self.share_rows(part, n_parts))

    def validation_set(self):
        """Return (x, y) of the validation rows, or None without a split."""
        return self.src.train_rows(self.validation_rows) if self.n_validation else None


class Evaluations:
    """Rank 0's evaluations: one parameter snapshot scored on the validation rows (when held out) and the test set,
    handed to the best-model tracker; the accuracy that decides (target, patience, choice) is the validation one,
    or the test one without a split.
    """

    def __init__(self, net, split: TrainingSplit, backend, patience=None, selection_margin: float = 0.0):
        x_test, y_test = split.src.test_set()
        self.test = Evaluator(net, x_test, y_test, backend)
        val = split.validation_set()
        self.validation = None if val is None else Evaluator(net, *val, backend)
        self.tracker = BestModelTracker(patience=patience if self.validation is not None else None,
                                        selection_margin=selection_margin, n_validation=split.n_validation)
        self.n_validation = split.n_validation
        self.last = {}

    def __call__(self, params_host, **extra) -> dict:
        """Score ``params_host`` (a host vector not changed afterwards by the caller), track it; return the figures
        ({test_loss, test_accuracy[, validation_loss, validation_accuracy, best_validation_accuracy]})."""
        out = {}
        if self.validation is not None:
            out["validation_loss"], out["validation_accuracy"] = self.validation(params_host)
        out["test_loss"], out["test_accuracy"] = self.test(params_host)
        self.tracker.observe(params_host, validation_accuracy=out.get("validation_accuracy"),
                             test_accuracy=out["test_accuracy"], test_loss=out["test_loss"], **extra)
        if self.validation is not None:
            out["best_validation_accuracy"] = self.tracker.best["validation_accuracy"]
        self.last = out
        return out

    @property
    def deciding_accuracy(self):
        """The accuracy a target and early stopping compare: validation when held out, else test."""
        return self.last.get("validation_accuracy", self.last.get("test_accuracy"))

    @property
    def should_stop(self) -> bool:
        return self.tracker.should_stop

    def finish(self, summary: dict, last_params) -> dict:
        """Fill ``summary`` with the model choice: ``params`` the selected model, ``last_params`` the last one when
        the best differs, test figures of the selected model, and the tracker's fields; return it."""
        chosen = self.tracker.selected
        summary.update(self.tracker.summary())
        summary["params"] = self.tracker.selected_params(last_params)
        if chosen == "best":
            summary["last_params"] = last_params
            summary["test_accuracy"] = self.tracker.best["test_accuracy"]
            summary["test_loss"] = self.tracker.best.get("test_loss", summary.get("test_loss"))
            summary["last_test_loss"] = self.last.get("test_loss")
        summary["validation_rows"] = self.n_validation
        return summary


def options_as_trained(opts) -> dict:
    """The summary's record of the options after ``sgd_defaults`` filled them (the config keeps only those given)."""
    return {"batch_size": int(opts.batch_size), "peak_lr": float(opts.lr), "momentum": float(opts.momentum)}


def schedule_budget(opts, stop, *, n_train: int, workers: int = 1):
    """Return ``(schedule, budget)``: ``opts.lr_schedule`` at peak ``opts.lr`` and the run's length in global samples
    of the ``n_train`` training rows (after the holdout, as StopRule counts) and/or seconds; budget None for a
    constant schedule (nothing to measure)."""
    schedule = opts.lr_schedule.with_lr(opts.lr)
    if schedule.is_constant:
        return schedule, None
    budget = RunBudget.from_limits(n_train=n_train, batch_size=opts.batch_size, workers=workers, epochs=stop.epochs,
                                   steps=stop.steps, time_limit=stop.time_limit)
    return schedule, budget
